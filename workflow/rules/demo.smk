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
        benchmark:
            benchmark_file("demo_cohort")
        conda:
            "../envs/anomri.yaml"
        # Subjects simulated at once (demo-cohort's workers, one BLAS thread each); the cohort does not depend on it.
        threads: 2
        resources:
            mem_mb=2000,  # 1.5x peak RSS 1246 MB on the demo cohort
            runtime=20,
        params:
            bids_dir=PLAN.bids_dir,
            demo=config["demo"],
        shell:
            '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} demo-cohort'
            " {params.bids_dir:q} --n-controls {params.demo[n_controls]:q}"
            " --n-patients {params.demo[n_patients]:q} --voxel-size {params.demo[voxel_size]:q}"
            " --scheme {params.demo[scheme]:q} --seed {params.demo[seed]:q}"
