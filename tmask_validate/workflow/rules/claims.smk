# Stage "claims": each qualitative claim of the paper as a row with the measured number, the
# threshold and pass/fail -> results/claims.csv. A failing claim is reported, never tuned away.


rule claims:
    input:
        metrics=R / "metrics" / "metrics.csv",
        similarity=R / "metrics" / "mask_similarity.csv",
        evidence=T.species_evidence_table(CFG, R),
    output:
        R / "claims.csv",
    params:
        config=EFFECTIVE_CONFIG,
        depends=lambda w: T._dump(CFG["analysis"]["claims"]),
        evidence=lambda w, input: f"--evidence {input.evidence}" if input.evidence else "",
    log:
        R / "logs" / "claims.log",
    threads: res("claims")["threads"]
    resources:
        mem_mb=res("claims")["mem_mb"],
        runtime=res("claims")["runtime"],
    shell:
        "tmask-validate claims --config {params.config} --metrics {input.metrics} "
        "--similarity {input.similarity} {params.evidence} --out {output} > {log} 2>&1"
