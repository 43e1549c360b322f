"""`pgpo demo`: the whole pipeline, learning, on a laptop CPU."""
