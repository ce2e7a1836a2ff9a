# Stage "report": one self-contained HTML page (figures embedded as base64 PNG, claims and
# metrics tables, captions) -> results/report/report.html.


rule report:
    input:
        figures=R / "figures" / "figures.json",
        claims=R / "claims.csv",
        metrics=R / "metrics" / "metrics.csv",
        evidence=T.species_evidence_table(CFG, R),
        evidence_figure=[str(R / "evidence" / "species_evidence.png")]
        if T.species_evidence_table(CFG, R) else [],
        experiments=expand(str(R / "experiments" / "{experiment}.png"),
                           experiment=T.experiments(CFG)),
    output:
        R / "report" / "report.html",
    params:
        config=EFFECTIVE_CONFIG,
        evidence=lambda w, input: f"--evidence {input.evidence}" if input.evidence else "",
    log:
        R / "logs" / "report.log",
    threads: res("report")["threads"]
    resources:
        mem_mb=res("report")["mem_mb"],
        runtime=res("report")["runtime"],
    shell:
        "tmask-validate report --config {params.config} --figures {input.figures} "
        "--claims {input.claims} --metrics {input.metrics} {params.evidence} "
        "--evidence-figures {input.evidence_figure} --extra-figures {input.experiments} "
        "--out {output} > {log} 2>&1"
