"""Training a job's model: the job's train step (`job.train_job`), the loop every method and sweep shares (`fit`),
its checkpoints, the configurations it trains (`runs`), the objective, the evaluation report and its plots."""
