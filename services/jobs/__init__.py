"""Running jobs: the extract and train steps the workers execute (`pipeline`), the plan and cost estimate of a
submission (`planner`), progress reporting, and the housekeeping of checkpoints and stuck jobs (`retention`,
`watchdog`). Torch-free where the API imports it."""
