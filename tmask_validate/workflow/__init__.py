"""The Snakemake workflow: rule files (``rules/*.smk``) and pure-python helpers.

The root ``Snakefile`` includes the rule files; :mod:`tmask_validate.workflow.targets` computes
every path and key from the config (this package never imports Snakemake).
"""
