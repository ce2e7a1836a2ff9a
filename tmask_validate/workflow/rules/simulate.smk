# Stage "simulate": abTEM ground truth. One job per structure x frozen-phonon chunk (the chunk
# keys c<i>-<j> come from simulation.phonons.{configurations,chunk_size}), then one combine job
# per structure averaging the chunks into results/simulate/<structure>.zarr.

rule simulate:
    output:
        directory(R / "simulate" / "{structure}" / "{chunk}.zarr"),
    params:
        config=EFFECTIVE_CONFIG,
        configurations=lambda w: T.chunk_ranges(CFG)[w.chunk],
        depends=lambda w: T.simulate_params(CFG, w.structure),
    log:
        R / "logs" / "simulate" / "{structure}" / "{chunk}.log",
    threads: res("simulate")["threads"]
    resources:
        mem_mb=res("simulate")["mem_mb"],
        runtime=res("simulate")["runtime"],
    shell:
        "tmask-validate simulate --config {params.config} --structure {wildcards.structure} "
        "--configurations {params.configurations} --out {output} --quiet > {log} 2>&1"


rule combine:
    input:
        lambda w: expand(str(R / "simulate" / w.structure / "{chunk}.zarr"),
                         chunk=T.chunk_keys(CFG)),
    output:
        directory(R / "simulate" / "{structure}.zarr"),
    log:
        R / "logs" / "combine" / "{structure}.log",
    threads: res("combine")["threads"]
    resources:
        mem_mb=res("combine")["mem_mb"],
        runtime=res("combine")["runtime"],
    shell:
        "tmask-validate combine {input} --out {output} > {log} 2>&1"
