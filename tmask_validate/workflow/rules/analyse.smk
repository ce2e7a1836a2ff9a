# Stage "analyse": every virtual image, template mask/image and control of ONE dataset
# (structure x dose x thickness) -> results/analysis/<structure>/<dose>/<thickness>.nc, plus its
# tidy metrics table (<thickness>.csv). Jobs read the combined (or noisy) store and select their
# thickness, so a new thickness or dose adds jobs without touching the others.


def _analyse_input(w):
    if w.dose == T.NOISELESS:
        return R / "simulate" / f"{w.structure}.zarr"
    return R / "noise" / w.structure / f"{w.dose}.zarr"


rule analyse:
    input:
        _analyse_input,
    output:
        nc=R / "analysis" / "{structure}" / "{dose}" / "{thickness}.nc",
        csv=R / "analysis" / "{structure}" / "{dose}" / "{thickness}.csv",
    params:
        config=EFFECTIVE_CONFIG,
        thickness=lambda w: T.thickness_values(CFG, w.structure)[w.thickness],
        depends=lambda w: T.analysis_params(CFG),
    log:
        R / "logs" / "analyse" / "{structure}" / "{dose}" / "{thickness}.log",
    threads: res("analyse")["threads"]
    resources:
        mem_mb=res("analyse")["mem_mb"],
        runtime=res("analyse")["runtime"],
    shell:
        "tmask-validate analyse {input} --thickness-nm {params.thickness} "
        "--config {params.config} --dose-key {wildcards.dose} --out {output.nc} "
        "--metrics-out {output.csv} > {log} 2>&1"


# Experimental datasets (config section "experiments"): the same analysis, sites fitted to the
# lattice of a virtual image (or read from a CSV), plus a summary figure.
rule analyse_experiment:
    input:
        lambda w: CFG["experiments"][w.experiment]["file"],
    output:
        nc=R / "experiments" / "{experiment}.nc",
        csv=R / "experiments" / "{experiment}.csv",
        png=R / "experiments" / "{experiment}.png",
    params:
        config=EFFECTIVE_CONFIG,
        depends=lambda w: T.experiment_params(CFG, w.experiment),
    log:
        R / "logs" / "analyse_experiment" / "{experiment}.log",
    threads: res("analyse_experiment")["threads"]
    resources:
        mem_mb=res("analyse_experiment")["mem_mb"],
        runtime=res("analyse_experiment")["runtime"],
    shell:
        "tmask-validate analyse {input} --config {params.config} "
        "--experiment {wildcards.experiment} --out {output.nc} --metrics-out {output.csv} "
        "--figure {output.png} > {log} 2>&1"
