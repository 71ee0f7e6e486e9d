"""An upload split across machines: plan slices (`slices.py`) and a Celery job whose
workers each take units of the plan (`jobs.py`)."""
