# Evaluation against lesion masks, and the derivatives' dataset description.


rule evaluate:
    input:
        [novelty_maps(s.prefix) for s in PLAN.evaluable],
        [derivatives(s.prefix).probseg for s in PLAN.evaluable],
        [s.lesion_mask for s in PLAN.evaluable],
    output:
        report(OUT / "evaluation.tsv", category="Evaluation"),
    log:
        LOGS / "evaluate.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        scans=" ".join(f"--scan {s.prefix} {s.lesion_mask}" for s in PLAN.evaluable),
        scores=" ".join(SCORES),
    shell:
        "{ANOMRI} --log {log} evaluate --derivatives-dir {OUT} {params.scans} --scores {params.scores}"
        " --out {output}"


rule dataset_description:
    output:
        OUT / "dataset_description.json",
    log:
        LOGS / "dataset_description.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        source=PLAN.bids_dir,
    shell:
        "{ANOMRI} --log {log} dataset-description --derivatives-dir {OUT} --source {params.source}"
