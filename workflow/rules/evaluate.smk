# Evaluation against lesion masks, and the derivatives' dataset description.


rule evaluate:
    input:
        [novelty_maps(s.prefix) for s in PLAN.evaluable + PLAN.calibration],
        [derivatives(s.prefix).neglog10p for s in PLAN.evaluable + PLAN.calibration],
        [derivatives(s.prefix).mask for s in PLAN.evaluable + PLAN.calibration + PLAN.holdout],
        [
            derivatives(s.prefix).lesion_mask(a)
            for s in PLAN.evaluable + PLAN.holdout
            for a in config["probability"]["levels"]
        ],
        [s.lesion_mask for s in PLAN.evaluable],
    output:
        table=report(OUT / "evaluation.tsv", caption="../report/dmri_evaluation.rst", category="Evaluation",
                     subcategory="Tables"),
        sidecar=OUT / "evaluation.json",
        summary=report(OUT / "evaluation_summary.tsv", caption="../report/dmri_summary.rst",
                       category="Evaluation", subcategory="Tables"),
        summary_sidecar=OUT / "evaluation_summary.json",
        curves=OUT / "evaluation_curves.json",
        healthy=report(OUT / "evaluation_healthy.tsv", caption="../report/dmri_healthy.rst",
                       category="Evaluation", subcategory="Tables"),
        healthy_sidecar=OUT / "evaluation_healthy.json",
    log:
        LOGS / "evaluate.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        scans=" ".join(f"--scan {s.prefix} {s.lesion_mask}" for s in PLAN.evaluable),
        calibration=prefixes(PLAN.calibration),
        healthy=prefixes(PLAN.holdout),
        levels=" ".join(str(a) for a in config["probability"]["levels"]),
        scores=" ".join(SCORES),
        ev=config["evaluation"],
    shell:
        "{ANOMRI} --log {log} evaluate --derivatives-dir {OUT} {params.scans} --calibration {params.calibration}"
        " --scores {params.scores} --fpr {params.ev[fpr]} --bootstrap {params.ev[bootstrap]} --seed {params.ev[seed]}"
        " --min-lesion-overlap {params.ev[min_lesion_overlap]} --healthy {params.healthy} --levels {params.levels}"
        " --out {output.table} --summary {output.summary} --curves {output.curves} --healthy-out {output.healthy}"


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
