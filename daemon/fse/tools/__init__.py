"""Tools built on the engine: calibrate and experiment, and the runner they share."""
