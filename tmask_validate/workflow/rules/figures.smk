# Stage "figures": the paper's figures reproduced on simulated data (PNG + PDF) and the sweep
# plots, listed with captions in results/figures/figures.json.


rule figures:
    input:
        nc=_all_analyses("nc"),
        metrics=R / "metrics" / "metrics.csv",
        similarity=R / "metrics" / "mask_similarity.csv",
    output:
        manifest=R / "figures" / "figures.json",
    params:
        config=EFFECTIVE_CONFIG,
        depends=lambda w: T._dump(CFG["analysis"]["figures"]),
    log:
        R / "logs" / "figures.log",
    threads: res("figures")["threads"]
    resources:
        mem_mb=res("figures")["mem_mb"],
        runtime=res("figures")["runtime"],
    shell:
        "tmask-validate figures --config {params.config} --analysis-dir "
        + str(R / "analysis") + " --metrics {input.metrics} --similarity {input.similarity} --out-dir "
        + str(R / "figures") + " > {log} 2>&1"
