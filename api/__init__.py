"""FastAPI app: routes (jobs, models, predict, health), schemas, auth and errors. The control plane imports no
torch; only the predict routes load models, lazily."""
