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
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        scans=prefixes(PLAN.training),
        sc=config["scoring"],
    shell:
        "{ANOMRI} --log {log} reference --derivatives-dir {OUT} --scans {params.scans} --model {input.model}"
        " --size {params.sc[reference_size]} --seed {params.sc[seed]} --out {output} --device {params.sc[device]}"


rule score:
    input:
        unpack(lambda wc: {"reference": OUT / "models" / "reference_set.pt"} if NEEDS_REFERENCE else {}),
        model=OUT / "models" / "vae.pt",
        features=scan_pattern("desc-qspace_features.nii.gz"),
        mask=scan_pattern("desc-brain_mask.nii.gz"),
    output:
        maps=[scan_pattern(f"desc-{s}_novelty.nii.gz") for s in SCORES],
        sidecars=[scan_pattern(f"desc-{s}_novelty.json") for s in SCORES],
    log:
        LOGS / "score" / "{subdir}" / "{prefix}.log",
    threads: 1
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=1 if config["scoring"]["device"] == "cuda" else 0,
    params:
        sc=config["scoring"],
        scores=" ".join(SCORES),
        reference=lambda wc, input: optional_flag("--reference", input, "reference"),
    shell:
        "{ANOMRI} --log {log} score --model {input.model} {params.reference} --derivatives-dir {OUT}"
        " --prefix {wildcards.prefix}"
        " --scores {params.scores} --n-samples {params.sc[n_samples]} --seed {params.sc[seed]}"
        " --batch-size {params.sc[batch_size]} --device {params.sc[device]}"


rule calibrate:
    input:
        [derivatives(s.prefix).novelty(k) for s in PLAN.calibration for k in PROBABILITY_SCORES],
        [derivatives(s.prefix).mask for s in PLAN.calibration],
        [derivatives(s.prefix).features for s in PLAN.calibration],
    output:
        OUT / "calibration" / "healthy_null.npz",
    log:
        LOGS / "calibrate.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        scans=prefixes(PLAN.calibration),
        scores=" ".join(PROBABILITY_SCORES),
        pp=config["probability"],
    shell:
        "{ANOMRI} --log {log} calibrate --derivatives-dir {OUT} --scans {params.scans}"
        " --scores {params.scores} --out {output} --erosion-voxels {params.pp[erosion_voxels]}"
        " --median-filter-voxels {params.pp[median_filter_voxels]}"
        " --smoothing-fwhm-mm {params.pp[smoothing_fwhm_mm]} --tail-fraction {params.pp[tail_fraction]}"
        " --combination {params.pp[combination]} --tissue-classes {params.pp[tissue_classes]} --seed {params.pp[seed]}"


rule probability:
    input:
        null=OUT / "calibration" / "healthy_null.npz",
        maps=[scan_pattern(f"desc-{k}_novelty.nii.gz") for k in PROBABILITY_SCORES],
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
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        pp=config["probability"],
        levels=" ".join(str(a) for a in config["probability"]["levels"]),
    shell:
        "{ANOMRI} --log {log} probability --derivatives-dir {OUT} --prefix {wildcards.prefix}"
        " --null {input.null} --levels {params.levels}"
        " --min-component-voxels {params.pp[min_component_voxels]}"


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
    threads: 1
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        calibration=prefixes(PLAN.calibration),
        labelled=" ".join(f"--scan {s.prefix} {s.lesion_mask}" for s in PLAN.evaluable),
        others=prefixes([s for s in PLAN.scans if s not in PLAN.evaluable]),
        scores=" ".join(SCORES),
        pp=config["probability"],
    shell:
        "{ANOMRI} --log {log} learn-combination --derivatives-dir {OUT} --calibration {params.calibration}"
        " {params.labelled} --apply {params.others} --scores {params.scores} --out {output.model}"
        " --C {params.pp[learned_combination][C]} --erosion-voxels {params.pp[erosion_voxels]}"
        " --median-filter-voxels {params.pp[median_filter_voxels]}"
        " --smoothing-fwhm-mm {params.pp[smoothing_fwhm_mm]} --tail-fraction {params.pp[tail_fraction]}"
        " --tissue-classes {params.pp[tissue_classes]} --seed {params.pp[seed]}"
