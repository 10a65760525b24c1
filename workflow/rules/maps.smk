# Novelty maps per scan from the fold models that never trained on it, calibration on every control's
# out-of-fold maps, lesion probability, quality table.


rule reference_set:
    input:
        model=OUT / "models" / "fold-{fold}" / "vae.pt",
        features=lambda wc: [derivatives(s.prefix).features for s in fold_training(wc.fold)],
        masks=lambda wc: [derivatives(s.prefix).mask for s in fold_training(wc.fold)],
    output:
        OUT / "models" / "fold-{fold}" / "reference_set.pt",
    log:
        LOGS / "reference_set" / "fold-{fold}.log",
    benchmark:
        benchmark_file("reference_set", "fold-{fold}")
    conda:
        "../envs/anomri.yaml"
    threads: config["scoring"]["threads"]
    resources:
        mem_mb=1000,  # 1.5x peak RSS 513 MB on the demo cohort
        runtime=30,
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        derivatives=OUT,
        scans=lambda wc: prefixes(fold_training(wc.fold)),
        sc=SCORING,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} reference'
        " --derivatives-dir {params.derivatives:q} --scans {params.scans:q}"
        " --model {input.model:q} --size {params.sc[reference_size]:q} --seed {params.sc[seed]:q} --out {output:q}"
        " --device {params.sc[device]:q}"


rule score_control:
    # A control's maps come from the one fold model that never trained on it: out of fold. Its noisier copies'
    # probability scores, the null each scan is matched to, come from the same model in the same job.
    input:
        unpack(scoring_inputs),
        features=scan_pattern("desc-qspace_features.nii.gz"),
        mask=scan_pattern("desc-brain_mask.nii.gz"),
        copy_features=lambda wc: [augmented(c, wc.prefix).features for c in CALIBRATION_COPIES],
        copy_masks=lambda wc: [augmented(c, wc.prefix).mask for c in CALIBRATION_COPIES],
    output:
        maps=[scan_pattern(f"desc-{desc_label(s)}_novelty.nii.gz") for s in SCORES],
        sidecars=[scan_pattern(f"desc-{desc_label(s)}_novelty.json") for s in SCORES],
        copy_maps=[
            copy_pattern(c, f"desc-{desc_label(k)}_novelty.nii.gz")
            for c in CALIBRATION_COPIES
            for k in PROBABILITY_SCORES
        ],
        copy_sidecars=[
            copy_pattern(c, f"desc-{desc_label(k)}_novelty.json")
            for c in CALIBRATION_COPIES
            for k in PROBABILITY_SCORES
        ],
    log:
        LOGS / "score" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("score_control", "{subdir}", "{prefix}")
    wildcard_constraints:
        prefix=prefix_regex(CONTROL_FOLD),
    conda:
        "../envs/anomri.yaml"
    threads: config["scoring"]["threads"]
    resources:
        mem_mb=measured_mem_mb(722, 6.9),  # max RSS 722 + 6.9 MB per input MB, x1.5 (was 1500)
        runtime=60,
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        derivatives=OUT,
        sc=SCORING,
        scores=SCORES,
        reference=lambda wc, input: ["--reference", *map(str, input.references)] if NEEDS_REFERENCE else [],
        copies=(
            ["--copies", *[AUGMENTED / c for c in CALIBRATION_COPIES], "--copy-scores", *PROBABILITY_SCORES]
            if CALIBRATION_COPIES
            else []
        ),
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} score --model {input.models:q}'
        " {params.reference:q} --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q}"
        " --scores {params.scores:q} {params.copies:q} --n-samples {params.sc[n_samples]:q} --seed {params.sc[seed]:q}"
        " --batch-size {params.sc[batch_size]:q} --device {params.sc[device]:q}"


rule score_ensemble:
    # Anyone else's maps: from the fold model it is dealt to, like a control of that fold (exchangeable with the
    # controls' out-of-fold maps); every fold model's own probability-score maps go to its fold's tree, for the
    # cross-conformal p.
    input:
        unpack(scoring_inputs),
        features=scan_pattern("desc-qspace_features.nii.gz"),
        mask=scan_pattern("desc-brain_mask.nii.gz"),
    output:
        maps=[scan_pattern(f"desc-{desc_label(s)}_novelty.nii.gz") for s in SCORES],
        sidecars=[scan_pattern(f"desc-{desc_label(s)}_novelty.json") for s in SCORES],
        fold_maps=[
            str(fold_maps(k) / "{subdir}" / "dwi" / f"{{prefix}}_space-dwi_desc-{desc_label(s)}_novelty.nii.gz")
            for k in FOLDS
            for s in PROBABILITY_SCORES
        ],
    log:
        LOGS / "score" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("score_ensemble", "{subdir}", "{prefix}")
    wildcard_constraints:
        prefix=prefix_regex([s.prefix for s in PLAN.others]),
    conda:
        "../envs/anomri.yaml"
    threads: config["scoring"]["threads"]
    resources:
        mem_mb=measured_mem_mb(722, 6.9),  # the score rule's line; the fold models' maps are held one at a time
        runtime=60 * len(FOLDS),
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        derivatives=OUT,
        sc=SCORING,
        scores=SCORES,
        fold_maps=lambda wc: [fold_maps(k) for k in scoring_models(wc.prefix)],
        fold_scores=PROBABILITY_SCORES,
        reference=lambda wc, input: ["--reference", *map(str, input.references)] if NEEDS_REFERENCE else [],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} score --model {input.models:q}'
        " {params.reference:q} --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q}"
        " --scores {params.scores:q} --fold-maps {params.fold_maps:q} --fold-scores {params.fold_scores:q}"
        " --n-samples {params.sc[n_samples]:q} --seed {params.sc[seed]:q}"
        " --batch-size {params.sc[batch_size]:q} --device {params.sc[device]:q}"


rule calibrate:
    input:
        [derivatives(s.prefix).novelty(k) for s in PLAN.controls for k in PROBABILITY_SCORES],
        [derivatives(s.prefix).mask for s in PLAN.controls],
        [derivatives(s.prefix).features for s in PLAN.controls],
        [
            augmented(copy, s.prefix).novelty(k)
            for s in PLAN.controls
            for copy in CALIBRATION_COPIES
            for k in PROBABILITY_SCORES
        ],
    output:
        OUT / "calibration" / "healthy_null.npz",
    log:
        LOGS / "calibrate.log",
    benchmark:
        benchmark_file("calibrate")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=measured_mem_mb(411, 18.6),  # max RSS 411 + 18.6 MB per input MB, x1.5 (was 1000)
        runtime=20,
    params:
        derivatives=OUT,
        scans=prefixes(PLAN.controls),
        scores=PROBABILITY_SCORES,
        pp=config["probability"],
        augmented=[AUGMENTED / copy for copy in CALIBRATION_COPIES],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} calibrate'
        " --derivatives-dir {params.derivatives:q} --scans {params.scans:q}"
        " --augmented {params.augmented:q}"
        " --scores {params.scores:q} --out {output:q} --erosion-voxels {params.pp[erosion_voxels]:q}"
        " --median-filter-voxels {params.pp[median_filter_voxels]:q}"
        " --smoothing-fwhm-mm {params.pp[smoothing_fwhm_mm]:q} --centring {params.pp[centring]:q}"
        " --tail-fraction {params.pp[tail_fraction]:q}"
        " --combination {params.pp[combination]:q} --tissue-classes {params.pp[tissue_classes]:q}"
        " --calibration-unit {params.pp[calibration_unit]:q} --seed {params.pp[seed]:q}"


rule probability:
    input:
        null=OUT / "calibration" / "healthy_null.npz",
        maps=probability_maps,
        mask=scan_pattern("desc-brain_mask.nii.gz"),
        features=scan_pattern("desc-qspace_features.nii.gz"),
    output:
        probseg=scan_pattern("label-L_probseg.nii.gz"),
        sidecar=scan_pattern("label-L_probseg.json"),
        evidence=scan_pattern("label-L_desc-neglog10p_novelty.nii.gz"),
        evidence_sidecar=scan_pattern("label-L_desc-neglog10p_novelty.json"),
        masks=[scan_pattern(f"label-L_desc-{level_label(a)}_mask.nii.gz") for a in config["probability"]["levels"]],
    log:
        LOGS / "probability" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("probability", "{subdir}", "{prefix}")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=measured_mem_mb(413, 6.5),  # max RSS 413 + 6.5 MB per input MB, x1.5 (was 1000)
        runtime=10,
    params:
        derivatives=OUT,
        pp=config["probability"],
        levels=config["probability"]["levels"],
        fold_maps=lambda wc: [] if wc.prefix in CONTROL_FOLD else ["--fold-maps", *map(str, map(fold_maps, FOLDS))],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} probability'
        " --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q}"
        " --null {input.null:q} --levels {params.levels:q} {params.fold_maps:q}"
        " --min-component-voxels {params.pp[min_component_voxels]:q} --ood-margin {params.pp[ood_margin]:q}"


rule quality:
    # Every scan's SNR, flagged fraction and out-of-distribution check, read from its probability sidecar.
    input:
        [derivatives(s.prefix).probseg for s in PLAN.scans],
    output:
        table=report(OUT / "quality.tsv", caption="../report/dmri_quality.rst", category="Quality"),
        sidecar=OUT / "quality.json",
    log:
        LOGS / "quality.log",
    benchmark:
        benchmark_file("quality")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        derivatives=OUT,
        scans=prefixes(PLAN.scans),
        controls=prefixes(PLAN.controls),
        levels=config["probability"]["levels"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} quality'
        " --derivatives-dir {params.derivatives:q} --scans {params.scans:q} --controls {params.controls:q}"
        " --levels {params.levels:q} --out {output.table:q}"


rule clusters:
    # Every scan's findings, labelled or not: the clusters of its lesion masks at each level.
    input:
        probseg=scan_pattern("label-L_probseg.nii.gz"),
        evidence=scan_pattern("label-L_desc-neglog10p_novelty.nii.gz"),
        masks=[scan_pattern(f"label-L_desc-{level_label(a)}_mask.nii.gz") for a in config["probability"]["levels"]],
    output:
        table=report(
            scan_pattern("label-L_desc-clusters_table.tsv"),
            caption="../report/dmri_clusters.rst",
            category="Findings",
            subcategory="Cluster tables",
            labels={"scan": "{prefix}"},
        ),
        sidecar=scan_pattern("label-L_desc-clusters_table.json"),
    log:
        LOGS / "clusters" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("clusters", "{subdir}", "{prefix}")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=500,  # 1.5x peak RSS 207 MB on a 1 mm scan (182 x 218 x 182); 71 MB on a 3 mm cohort
        runtime=5,
    params:
        derivatives=OUT,
        levels=config["probability"]["levels"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} clusters'
        " --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q} --levels {params.levels:q}"


rule learn_combination:
    # Opt-in (probability.learned_combination.enabled): every computed score, combined by a logistic
    # model on the labelled patients, leave-one-patient-out.
    input:
        [novelty_maps(s.prefix) for s in PLAN.scans],
        [derivatives(s.prefix).mask for s in PLAN.scans],
        [derivatives(s.prefix).features for s in PLAN.scans],
        [s.lesion_mask for s in PLAN.evaluable],
    output:
        model=OUT / "calibration" / "learned_combination.json",
        maps=[derivatives(s.prefix).learned_probseg for s in PLAN.scans],
    log:
        LOGS / "learn_combination.log",
    benchmark:
        benchmark_file("learn_combination")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=6000,  # not measured (opt-in, off in the demo): every computed score of every scan at once
        runtime=30,
    params:
        derivatives=OUT,
        calibration=prefixes(PLAN.controls),
        labelled=scan_args(PLAN.evaluable),
        others=prefixes([s for s in PLAN.scans if s not in PLAN.evaluable]),
        scores=SCORES,
        pp=config["probability"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} learn-combination --derivatives-dir {params.derivatives:q}'
        " --calibration {params.calibration:q} {params.labelled:q} --apply {params.others:q}"
        " --scores {params.scores:q} --out {output.model:q}"
        " --C {params.pp[learned_combination][C]:q} --erosion-voxels {params.pp[erosion_voxels]:q}"
        " --median-filter-voxels {params.pp[median_filter_voxels]:q}"
        " --smoothing-fwhm-mm {params.pp[smoothing_fwhm_mm]:q} --centring {params.pp[centring]:q}"
        " --tail-fraction {params.pp[tail_fraction]:q}"
        " --tissue-classes {params.pp[tissue_classes]:q} --seed {params.pp[seed]:q}"
