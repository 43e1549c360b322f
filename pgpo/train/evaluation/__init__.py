"""Scoring a run: held-out evaluation and the teacher's edge (:mod:`.evaluate`), exact
scores that teacher-force every candidate answer (:mod:`.exact`, ``pgpo teacher-check``), and the
premise study's per-sample record of misleading feedback (:mod:`.feedback`)."""
