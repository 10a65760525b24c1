# Pool healthy training voxels and train the VAE on them.


rule pool_training_voxels:
    input:
        [derivatives(s.prefix).features for s in PLAN.training],
        [derivatives(s.prefix).mask for s in PLAN.training],
    output:
        OUT / "models" / "training_voxels.npz",
    log:
        LOGS / "pool_training_voxels.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=20,
    params:
        scans=prefixes(PLAN.training),
        max_voxels=config["training"]["max_voxels_per_scan"],
        seed=config["training"]["seed"],
    shell:
        "{ANOMRI} --log {log} pool --derivatives-dir {OUT} --scans {params.scans} --out {output}"
        " --max-voxels-per-scan {params.max_voxels} --seed {params.seed}"


rule train:
    input:
        OUT / "models" / "training_voxels.npz",
    output:
        model=OUT / "models" / "vae.pt",
        history=report(OUT / "models" / "training_history.tsv", category="Training"),
    log:
        LOGS / "train.log",
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1 if config["training"]["device"] == "cuda" else 0,
    params:
        settings=settings_json("training", exclude=("device", "max_voxels_per_scan")),
        device=config["training"]["device"],
    shell:
        "{ANOMRI} --log {log} train --pool {input} --out {output.model} --history {output.history}"
        " --settings {params.settings} --device {params.device}"
