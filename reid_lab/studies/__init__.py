"""Compatible-upgrade studies: the runner of ``reid-lab upgrade`` and its reports (above the modules: it
trains them)."""
