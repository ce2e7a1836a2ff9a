# Stage "metrics": aggregate every dataset's metrics into results/metrics/metrics.csv (tidy) and
# metrics.nc (thickness and dose as coordinates), adding mask similarities across thickness and
# noiseless-vs-noisy.


def _all_analyses(ext):
    return [str(R / "analysis" / s / d / f"{t}.{ext}") for s, d, t in T.datasets(CFG)]


rule metrics:
    input:
        nc=_all_analyses("nc"),
        csv=_all_analyses("csv"),
    output:
        csv=R / "metrics" / "metrics.csv",
        nc=R / "metrics" / "metrics.nc",
        similarity=R / "metrics" / "mask_similarity.csv",
    params:
        config=EFFECTIVE_CONFIG,
    log:
        R / "logs" / "metrics.log",
    threads: res("metrics")["threads"]
    resources:
        mem_mb=res("metrics")["mem_mb"],
        runtime=res("metrics")["runtime"],
    shell:
        "tmask-validate metrics {input.nc} --config {params.config} --out-dir "
        + str(R / "metrics") + " > {log} 2>&1"
