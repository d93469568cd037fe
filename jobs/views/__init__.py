"""The browser pages of the fine-tuning domain, one module per subject: datasets (with their
evaluations, leaderboard and the playground), jobs, adapters, the wizard, usage, the ops
dashboard and /metrics. Routes: jobs/urls.py."""
