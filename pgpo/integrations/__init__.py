"""PGPO for other trainers. Each integration is imported only when used
(``from pgpo.integrations.trl import PGPOSDPOTrainer``)."""
