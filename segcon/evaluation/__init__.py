"""Metrics, inference, reports and figures shared by validation, segcon-eval and segcon-predict."""
