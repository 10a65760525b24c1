# Evaluation against lesion masks, and the derivatives' dataset description.


rule evaluate:
    input:
        [novelty_maps(s.prefix) for s in PLAN.evaluable + PLAN.controls],
        [derivatives(s.prefix).neglog10p for s in PLAN.evaluable + PLAN.controls],
        [derivatives(s.prefix).mask for s in PLAN.evaluable + PLAN.controls],
        [
            derivatives(s.prefix).lesion_mask(a)
            for s in PLAN.evaluable + PLAN.controls
            for a in config["probability"]["levels"]
        ],
        [s.lesion_mask for s in PLAN.evaluable],
    output:
        table=report(
            OUT / "evaluation.tsv",
            caption="../report/dmri_evaluation.rst",
            category="Evaluation",
            subcategory="Tables",
        ),
        sidecar=OUT / "evaluation.json",
        summary=report(
            OUT / "evaluation_summary.tsv",
            caption="../report/dmri_summary.rst",
            category="Evaluation",
            subcategory="Tables",
        ),
        summary_sidecar=OUT / "evaluation_summary.json",
        curves=OUT / "evaluation_curves.json",
        healthy=report(
            OUT / "evaluation_healthy.tsv",
            caption="../report/dmri_healthy.rst",
            category="Evaluation",
            subcategory="Tables",
        ),
        healthy_sidecar=OUT / "evaluation_healthy.json",
    log:
        LOGS / "evaluate.log",
    benchmark:
        benchmark_file("evaluate")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=measured_mem_mb(414, 0.7),  # max RSS 414 + 0.7 MB per input MB, x1.5 (was 1000)
        runtime=20,
    params:
        derivatives=OUT,
        scans=scan_args(PLAN.evaluable),
        calibration=prefixes(PLAN.controls),
        healthy=prefixes(PLAN.controls),
        levels=config["probability"]["levels"],
        scores=SCORES,
        ev=config["evaluation"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} evaluate'
        " --derivatives-dir {params.derivatives:q} {params.scans:q}"
        " --calibration {params.calibration:q} --scores {params.scores:q} --fpr {params.ev[fpr]:q}"
        " --bootstrap {params.ev[bootstrap]:q} --seed {params.ev[seed]:q}"
        " --min-lesion-overlap {params.ev[min_lesion_overlap]:q} --healthy {params.healthy:q}"
        " --levels {params.levels:q} --out {output.table:q} --summary {output.summary:q} --curves {output.curves:q}"
        " --healthy-out {output.healthy:q}"


rule dataset_description:
    # The BIDS dataset-level files: which desc labels the run writes, and what BIDS has no place for.
    output:
        OUT / "dataset_description.json",
        OUT / "descriptions.tsv",
        OUT / "descriptions.json",
        OUT / ".bidsignore",
        OUT / "README.md",
    log:
        LOGS / "dataset_description.log",
    benchmark:
        benchmark_file("dataset_description")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,  # 1.5x peak RSS 255 MB on the demo cohort
        runtime=5,
    params:
        derivatives=OUT,
        source=PLAN.bids_dir,
        scores=SCORES,
        levels=config["probability"]["levels"],
        learned=["--learned"] if LEARNED else [],
        # Not on the command line: a new anomri whose dataset-level files differ (.bidsignore, desc labels) rewrites
        # them in a finished run.
        layout=layout_digest(),
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} dataset-description'
        " --derivatives-dir {params.derivatives:q} --source {params.source:q} --scores {params.scores:q}"
        " --levels {params.levels:q} {params.learned:q}"
