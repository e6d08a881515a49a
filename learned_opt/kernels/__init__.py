"""Hand-written CPU kernels for the LSTM step (``stack``), built on first use (``build``);
``learned_opt.backend`` chooses when they run."""
