# Novelty maps per scan, calibration on held-out controls, lesion probability.


rule reference_set:
    input:
        model=OUT / "models" / "vae.pt",
        features=[derivatives(s.prefix).features for s in PLAN.training],
        masks=[derivatives(s.prefix).mask for s in PLAN.training],
    output:
        OUT / "models" / "reference_set.pt",
    log:
        LOGS / "reference_set.log",
    benchmark:
        benchmark_file("reference_set")
    conda:
        "../envs/anomri.yaml"
    threads: config["scoring"]["threads"]
    resources:
        mem_mb=1000,  # 1.5x peak RSS 513 MB on the demo cohort
        runtime=30,
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        derivatives=OUT,
        scans=prefixes(PLAN.training),
        sc=SCORING,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} reference'
        " --derivatives-dir {params.derivatives:q} --scans {params.scans:q}"
        " --model {input.model:q} --size {params.sc[reference_size]:q} --seed {params.sc[seed]:q} --out {output:q}"
        " --device {params.sc[device]:q}"


rule score:
    input:
        unpack(lambda wc: {"reference": OUT / "models" / "reference_set.pt"} if NEEDS_REFERENCE else {}),
        model=OUT / "models" / "vae.pt",
        features=scan_pattern("desc-qspace_features.nii.gz"),
        mask=scan_pattern("desc-brain_mask.nii.gz"),
    output:
        maps=[scan_pattern(f"desc-{desc_label(s)}_novelty.nii.gz") for s in SCORES],
        sidecars=[scan_pattern(f"desc-{desc_label(s)}_novelty.json") for s in SCORES],
    log:
        LOGS / "score" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("score", "{subdir}", "{prefix}")
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
        reference=lambda wc, input: optional_flag("--reference", input, "reference"),
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} score --model {input.model:q} {params.reference:q}'
        " --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q}"
        " --scores {params.scores:q} --n-samples {params.sc[n_samples]:q} --seed {params.sc[seed]:q}"
        " --batch-size {params.sc[batch_size]:q} --device {params.sc[device]:q}"


rule score_augmented:
    # The probability scores of a calibration control's noisier copy: the null each scan is matched to.
    input:
        unpack(lambda wc: {"reference": OUT / "models" / "reference_set.pt"} if PROBABILITY_NEEDS_REFERENCE else {}),
        model=OUT / "models" / "vae.pt",
        features=augmented_pattern("desc-qspace_features.nii.gz"),
        mask=augmented_pattern("desc-brain_mask.nii.gz"),
    output:
        maps=[augmented_pattern(f"desc-{desc_label(k)}_novelty.nii.gz") for k in PROBABILITY_SCORES],
        sidecars=[augmented_pattern(f"desc-{desc_label(k)}_novelty.json") for k in PROBABILITY_SCORES],
    log:
        LOGS / "score_augmented" / "noise-{level}" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("score_augmented", "noise-{level}", "{subdir}", "{prefix}")
    conda:
        "../envs/anomri.yaml"
    threads: config["scoring"]["threads"]
    resources:
        mem_mb=1500,  # 1.5x peak RSS 771 MB on the demo cohort, 4 jobs
        runtime=30,
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        tree=lambda wc: AUGMENTED / f"noise-{wc.level}",
        sc=SCORING,
        scores=PROBABILITY_SCORES,
        reference=lambda wc, input: optional_flag("--reference", input, "reference"),
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} score --model {input.model:q} {params.reference:q}'
        " --derivatives-dir {params.tree:q} --prefix {wildcards.prefix:q}"
        " --scores {params.scores:q} --n-samples {params.sc[n_samples]:q} --seed {params.sc[seed]:q}"
        " --batch-size {params.sc[batch_size]:q} --device {params.sc[device]:q}"


rule calibrate:
    input:
        [derivatives(s.prefix).novelty(k) for s in PLAN.calibration for k in PROBABILITY_SCORES],
        [derivatives(s.prefix).mask for s in PLAN.calibration],
        [derivatives(s.prefix).features for s in PLAN.calibration],
        [
            augmented(level, s.prefix).novelty(k)
            for s in PLAN.calibration
            for level in CALIBRATION_LEVELS
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
        scans=prefixes(PLAN.calibration),
        scores=PROBABILITY_SCORES,
        pp=config["probability"],
        augmented=[AUGMENTED / f"noise-{level}" for level in CALIBRATION_LEVELS],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} calibrate'
        " --derivatives-dir {params.derivatives:q} --scans {params.scans:q}"
        " --augmented {params.augmented:q}"
        " --scores {params.scores:q} --out {output:q} --erosion-voxels {params.pp[erosion_voxels]:q}"
        " --median-filter-voxels {params.pp[median_filter_voxels]:q}"
        " --smoothing-fwhm-mm {params.pp[smoothing_fwhm_mm]:q} --tail-fraction {params.pp[tail_fraction]:q}"
        " --combination {params.pp[combination]:q} --tissue-classes {params.pp[tissue_classes]:q}"
        " --seed {params.pp[seed]:q}"


rule probability:
    input:
        null=OUT / "calibration" / "healthy_null.npz",
        maps=[scan_pattern(f"desc-{desc_label(k)}_novelty.nii.gz") for k in PROBABILITY_SCORES],
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
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} probability'
        " --derivatives-dir {params.derivatives:q} --prefix {wildcards.prefix:q}"
        " --null {input.null:q} --levels {params.levels:q}"
        " --min-component-voxels {params.pp[min_component_voxels]:q}"


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
        calibration=prefixes(PLAN.calibration),
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
        " --smoothing-fwhm-mm {params.pp[smoothing_fwhm_mm]:q} --tail-fraction {params.pp[tail_fraction]:q}"
        " --tissue-classes {params.pp[tissue_classes]:q} --seed {params.pp[seed]:q}"
