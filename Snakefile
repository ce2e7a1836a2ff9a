# Validation workflow for template masks (thin: every rule calls a `tmask-validate` subcommand).
#
#   tmask-validate workflow --config config/default.yaml --cores 2      (recommended)
#   snakemake --cores 2 --configfile config/smoke.yaml                  (plain snakemake;
#                                                 the config file is required)
#
# Stages (one rule file each, tmask_validate/workflow/rules/): simulate (one job per structure x
# frozen-phonon chunk, then combine) -> noise (one job per structure x dose) -> analyse (one job
# per structure x dose x thickness) -> metrics -> figures -> claims -> report; and the species
# evidence (evidence.smk: species-removed variants, held-out cells -> species_evidence.csv),
# which claims and report take as an input.
import re
from pathlib import Path

from tmask_validate.config import validate_config
from tmask_validate.workflow import targets as T

# No `configfile:` directive: Snakemake would deep-merge that file under the user's
# --configfile, so keys the user's file leaves out would silently come from it. The config is
# the user's file alone (plus --config overrides), validated and filled from the schema defaults.
if not workflow.configfiles:
    raise ValueError("no config given: run `tmask-validate workflow --config config/smoke.yaml` "
                     "or `snakemake --configfile config/smoke.yaml ...`")
CFG = validate_config(config)
# experiment paths in a config are relative to the config file
T.resolve_experiment_paths(CFG, Path(workflow.configfiles[-1]).parent)
R = Path(CFG["workflow"]["results_dir"])
# the effective config (file + --config overrides + defaults) handed to every command;
# rewritten only when its content changes, and never a rule input (params carry what jobs use)
EFFECTIVE_CONFIG = str(T.write_if_changed(R / "config" / f"{CFG['name']}.yaml", CFG))
RULES_DIR = Path(workflow.basedir) / "tmask_validate" / "workflow" / "rules"

wildcard_constraints:
    structure="|".join(T.structures(CFG)) or "NONE",
    chunk=r"c\d+-\d+",
    dose=r"noiseless|d[0-9.e-]+",
    thickness=r"t[0-9.e-]+nm",
    experiment="|".join(T.experiments(CFG)) or "NONE",
    variant="|".join(re.escape(v) for v in T.all_evidence_variants(CFG)) or "NONE",


def res(rule):
    return T.resources(CFG, rule)


rule all:
    input:
        R / "report" / "report.html",
        R / "claims.csv",
        R / "metrics" / "metrics.csv",
        expand(str(R / "experiments" / "{experiment}.nc"), experiment=T.experiments(CFG)),
        T.species_evidence_table(CFG, R),
    default_target: True


include: str(RULES_DIR / "simulate.smk")
include: str(RULES_DIR / "noise.smk")
include: str(RULES_DIR / "analyse.smk")
include: str(RULES_DIR / "metrics.smk")
include: str(RULES_DIR / "figures.smk")
include: str(RULES_DIR / "evidence.smk")
include: str(RULES_DIR / "claims.smk")
include: str(RULES_DIR / "report.smk")
