# Figures of the HTML report (snakemake --report report.html): ROC/PR curves per score, one overlay
# per patient with a lesion mask, one findings figure per scan (labelled or not), training curves.
# They are part of the default target, so the report finds them; so is the cohort page, cohort.html.
# Thin rules only: each calls one `anomri` command. Their paths: FIGURES (rules/common.smk).


rule plot_curves:
    input:
        OUT / "evaluation_curves.json",
    output:
        [
            report(
                FIGURES.curves(m),
                caption="../report/dmri_curves.rst",
                category="Evaluation",
                subcategory="ROC and PR curves",
                labels={"score": m},
            )
            for m in EVALUATED_MAPS
        ],
    log:
        LOGS / "figures" / "curves.log",
    benchmark:
        benchmark_file("plot_curves")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,  # 1.5x peak RSS 212 MB on the demo cohort
        runtime=10,
    params:
        figures=FIGURES.root,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} plot-curves --curves {input:q} --figures-dir {params.figures:q}'


rule plot_overlay:
    input:
        lesion=lambda wc: SCANS[wc.prefix].lesion_mask,
        evaluation=OUT / "evaluation.tsv",
        b0=lambda wc: derivatives(wc.prefix).b0,
        mask=lambda wc: derivatives(wc.prefix).mask,
        evidence=lambda wc: derivatives(wc.prefix).neglog10p,
    output:
        report(
            FIGURES.overlay("{prefix}"),
            caption="../report/dmri_overlay.rst",
            category="Patients",
            subcategory="Overlays",
            labels={"scan": "{prefix}"},
        ),
    log:
        LOGS / "figures" / "overlay_{prefix}.log",
    benchmark:
        benchmark_file("plot_overlay", "{prefix}")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,  # 1.5x peak RSS 208 MB on the demo cohort, 4 jobs
        runtime=10,
    params:
        derivatives=OUT,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} plot-overlay'
        " --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q}"
        " --lesion-mask {input.lesion:q} --evaluation {input.evaluation:q} --out {output:q}"


rule plot_findings:
    # Any scan, labelled or not: -log10 p over the mean b0 through its largest flagged clusters.
    input:
        unpack(findings_inputs),
    output:
        report(
            FIGURES.findings("{prefix}"),
            caption="../report/dmri_findings.rst",
            category="Findings",
            subcategory="Figures",
            labels={"scan": "{prefix}"},
        ),
    log:
        LOGS / "figures" / "findings_{prefix}.log",
    benchmark:
        benchmark_file("plot_findings", "{prefix}")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=600,  # 1.5x peak RSS 328 MB on a 1 mm scan (182 x 218 x 182); 207 MB on a 3 mm cohort
        runtime=10,
    params:
        derivatives=OUT,
        levels=config["probability"]["levels"],
        lesion=lambda wc, input: optional_flag("--lesion-mask", input, "lesion"),
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} plot-findings'
        " --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q} --levels {params.levels:q}"
        " {params.lesion:q} --out {output:q}"


rule cohort_page:
    # One HTML file, opened without a server: every scan's findings and quality checks, linking its figure and table.
    input:
        quality=OUT / "quality.tsv",
        tables=[derivatives(s.prefix).clusters_table for s in PLAN.scans],
        figures=[FIGURES.findings(s.prefix) for s in PLAN.scans],
    output:
        OUT / "cohort.html",
    log:
        LOGS / "cohort_page.log",
    benchmark:
        benchmark_file("cohort_page")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,  # 1.5x peak RSS 187 MB on a 10-scan cohort: the tables only, not the images
        runtime=5,
    params:
        derivatives=OUT,
        levels=config["probability"]["levels"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} cohort-page'
        " --derivatives-dir {params.derivatives:q} --quality {input.quality:q} --levels {params.levels:q}"
        " --out {output:q}"


rule plot_training:
    input:
        [fold_dir(k) / "training_history.tsv" for k in FOLDS],
    output:
        report(FIGURES.training, caption="../report/dmri_training.rst", category="Training", subcategory="Curves"),
    log:
        LOGS / "figures" / "training.log",
    benchmark:
        benchmark_file("plot_training")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,  # 1.5x peak RSS 196 MB on the demo cohort
        runtime=5,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} plot-training --history {input:q} --out {output:q}'
