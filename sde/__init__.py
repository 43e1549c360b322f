"""SDE toolkit: the modulated-drift SDE of PGPO, discrete chains, weak error against eta."""
