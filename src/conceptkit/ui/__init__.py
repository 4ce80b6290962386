"""The web UI: `conceptkit ui` (app.py) over a job queue for long jobs (jobs.py)."""
