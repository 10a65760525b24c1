# The synthetic demo cohort, generated only when bids_dir is "demo".
if config["bids_dir"] == "demo":

    rule demo_cohort:
        output:
            PLAN.bids_dir / "participants.tsv",
            [scan.dwi for scan in PLAN.scans],
            [scan.bval for scan in PLAN.scans],
            [scan.bvec for scan in PLAN.scans],
            [scan.lesion_mask for scan in PLAN.scans if scan.lesion_mask],
        log:
            LOGS / "demo_cohort.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime=20,
        params:
            demo=config["demo"],
        shell:
            "{ANOMRI} --log {log} demo-cohort {PLAN.bids_dir} --n-controls {params.demo[n_controls]}"
            " --n-patients {params.demo[n_patients]} --voxel-size {params.demo[voxel_size]}"
            " --scheme {params.demo[scheme]} --seed {params.demo[seed]}"
