"""Experiments: configs, the Lightning runner, tasks, logging, reports and the `sparsevlm` CLI."""
