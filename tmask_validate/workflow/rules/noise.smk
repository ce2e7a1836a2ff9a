# Stage "noise": Poisson dose series of each combined simulation, one job per structure x dose
# key (d<dose> formatted from dose.doses_e_per_A2). Changing one dose re-runs only its jobs.

rule noise:
    input:
        R / "simulate" / "{structure}.zarr",
    output:
        directory(R / "noise" / "{structure}" / "{dose}.zarr"),
    params:
        seed=CFG["dose"].get("seed", 0),
        dose=lambda w: T.dose_values(CFG)[w.dose],
        depends=lambda w: T.noise_params(CFG, w.dose),
    log:
        R / "logs" / "noise" / "{structure}" / "{dose}.log",
    threads: res("noise")["threads"]
    resources:
        mem_mb=res("noise")["mem_mb"],
        runtime=res("noise")["runtime"],
    shell:
        "tmask-validate noise {input} --dose {params.dose} --seed {params.seed} "
        "--out {output} > {log} 2>&1"
