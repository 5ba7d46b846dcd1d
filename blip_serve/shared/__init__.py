"""What more than one process kind reads: settings, errors, the model's files, jobs and the route
table. No torch, no FastAPI."""
