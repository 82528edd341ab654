"""The control plane's decisions: decide(), analysis verdicts and actions; pure, no I/O."""
