# Pool healthy training voxels and train one VAE per cross-fitting fold on them.


rule pool_training_voxels:
    input:
        lambda wc: [derivatives(s.prefix).features for s in fold_training(wc.fold)],
        lambda wc: [derivatives(s.prefix).mask for s in fold_training(wc.fold)],
        lambda wc: [augmented(copy, s.prefix).features for s in fold_training(wc.fold) for copy in TRAINING_COPIES],
    output:
        OUT / "models" / "fold-{fold}" / "training_voxels.npz",
    log:
        LOGS / "pool_training_voxels" / "fold-{fold}.log",
    benchmark:
        benchmark_file("pool_training_voxels", "fold-{fold}")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=1000,  # 1.5x peak RSS 374 MB on the demo cohort
        runtime=20,
    params:
        derivatives=OUT,
        scans=lambda wc: prefixes(fold_training(wc.fold)),
        augmented=[AUGMENTED / copy for copy in TRAINING_COPIES],
        max_voxels=config["training"]["max_voxels_per_scan"],
        max_training_voxels=config["training"]["max_training_voxels"],
        seed=config["training"]["seed"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} pool'
        " --derivatives-dir {params.derivatives:q} --scans {params.scans:q}"
        " --augmented {params.augmented:q} --out {output:q} --max-voxels-per-scan {params.max_voxels:q}"
        " --max-training-voxels {params.max_training_voxels:q} --seed {params.seed:q}"


rule train:
    input:
        OUT / "models" / "fold-{fold}" / "training_voxels.npz",
    output:
        model=OUT / "models" / "fold-{fold}" / "vae.pt",
        history=report(
            OUT / "models" / "fold-{fold}" / "training_history.tsv",
            category="Training",
            labels={"fold": "{fold}"},
        ),
    log:
        LOGS / "train" / "fold-{fold}.log",
    benchmark:
        benchmark_file("train", "fold-{fold}")
    conda:
        "../envs/anomri.yaml"
    # A fixed count, not workflow.cores: a cluster run has no total core count.
    threads: config["training"]["threads"]
    resources:
        mem_mb=measured_mem_mb(504, 4.5),  # max RSS 504 + 4.5 MB per input MB, x1.5 (was 1000)
        runtime=120,
        gpu=1 if config["training"]["device"] == "cuda" else 0,
    params:
        settings=settings_json(
            "training",
            exclude=(
                "device",
                "max_voxels_per_scan",
                "max_training_voxels",
                "threads",
                "noise_augmentation",
                "diffusivity_augmentation",
                "anisotropy_augmentation",
            ),
        ),
        device=config["training"]["device"],
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} train'
        " --pool {input:q} --out {output.model:q} --history {output.history:q}"
        " --settings {params.settings:q} --device {params.device:q}"
