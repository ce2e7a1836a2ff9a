# Stage "evidence": species evidence on held-out cells (tmask_validate.evidence).
# simulate_variant: one job per structure x variant (crystal, <species>-x0 = those columns emptied,
# <species>-x<occ> = partial occupancy) x phonon configuration, all variants displaced from the
# SAME full crystal (shared atoms keep their displacements) -> results/evidence/simulate/...
# evidence: per structure x thickness, multi-cell noisy fields, held-out cells, random-site nulls
# -> results/evidence/<structure>/t<thickness>nm.csv; evidence_table: results/species_evidence.csv, the
# detection-limit table and the evidence figure.


rule simulate_variant:
    output:
        directory(R / "evidence" / "simulate" / "{structure}" / "{variant}" / "{chunk}.zarr"),
    params:
        config=EFFECTIVE_CONFIG,
        configurations=lambda w: T.evidence_chunk_ranges(CFG)[w.chunk],
        depends=lambda w: T.variant_params(CFG, w.structure, w.variant),
    log:
        R / "logs" / "simulate_variant" / "{structure}" / "{variant}" / "{chunk}.log",
    threads: res("simulate_variant")["threads"]
    resources:
        mem_mb=res("simulate_variant")["mem_mb"],
        runtime=res("simulate_variant")["runtime"],
    shell:
        "tmask-validate simulate --config {params.config} --structure {wildcards.structure} "
        "--variant '{wildcards.variant}' --configurations {params.configurations} "
        "--out '{output}' --quiet > '{log}' 2>&1"


def _variant_stores(w):
    return [str(R / "evidence" / "simulate" / w.structure / v / f"{c}.zarr")
            for v in T.evidence_variants(CFG, w.structure) for c in T.evidence_chunk_ranges(CFG)]


rule evidence:
    input:
        _variant_stores,
    output:
        csv=R / "evidence" / "{structure}" / "{thickness}.csv",
        images=R / "evidence" / "{structure}" / "{thickness}.npz",
    params:
        config=EFFECTIVE_CONFIG,
        depends=lambda w: T.evidence_params(CFG),
        stores=lambda w, input: " ".join(f"'{p}'" for p in input),
        thickness=lambda w: T.evidence_thickness_values(CFG, w.structure)[w.thickness],
    log:
        R / "logs" / "evidence" / "{structure}" / "{thickness}.log",
    threads: res("evidence")["threads"]
    resources:
        mem_mb=res("evidence")["mem_mb"],
        runtime=res("evidence")["runtime"],
    shell:
        "tmask-validate evidence {params.stores} --config {params.config} "
        "--structure {wildcards.structure} --thickness-nm {params.thickness} "
        "--out {output.csv} --images {output.images} "
        "> {log} 2>&1"


rule evidence_table:
    input:
        csv=T.evidence_jobs(CFG, R, "csv"),
        images=T.evidence_jobs(CFG, R, "npz"),
    output:
        table=R / "species_evidence.csv",
        limits=R / "evidence" / "detection_limits.csv",
        figure=R / "evidence" / "species_evidence.png",
    log:
        R / "logs" / "evidence_table.log",
    threads: res("evidence_table")["threads"]
    resources:
        mem_mb=res("evidence_table")["mem_mb"],
        runtime=res("evidence_table")["runtime"],
    shell:
        "tmask-validate evidence-table {input.csv} --images {input.images} --out {output.table} "
        "--limits-out {output.limits} --figure {output.figure} > {log} 2>&1"
