"""Many runs from one command: ``pgpo sweep`` over a grid (:mod:`.sweep`) and ``pgpo table``
over its folders (:mod:`.table`). They call the recipe (:mod:`pgpo.train.loop`); nothing in the
recipe calls them."""
