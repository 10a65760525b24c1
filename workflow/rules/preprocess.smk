# Validate and preprocess every scan (dipy): brain mask, denoising, S/S0, q-space features.


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        mask=scan_pattern("desc-brain_mask.nii.gz"),
        mask_sidecar=scan_pattern("desc-brain_mask.json"),
        b0=scan_pattern("desc-meanb0_S0map.nii.gz"),
        b0_sidecar=scan_pattern("desc-meanb0_S0map.json"),
        features=scan_pattern("desc-qspace_features.nii.gz"),
        sidecar=scan_pattern("desc-qspace_features.json"),
    log:
        LOGS / "preprocess" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("preprocess", "{subdir}", "{prefix}")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=measured_mem_mb(158, 7.7),  # max RSS 158 + 7.7 MB per input MB, x1.5 (was 1000)
        runtime=30,
    params:
        derivatives=OUT,
        source=PLAN.bids_dir,
        pre=config["preprocessing"],
        mask=lambda wc, input: optional_flag("--mask", input, "mask"),
        lesion=lambda wc, input: optional_flag("--lesion-mask", input, "lesion"),
        gibbs="--gibbs-removal" if config["preprocessing"]["gibbs_removal"] else "--no-gibbs-removal",
        motion="--motion-correction" if config["preprocessing"]["motion_correction"] else "--no-motion-correction",
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} preprocess'
        " --dwi {input.dwi:q} --bval {input.bval:q} --bvec {input.bvec:q}"
        " --output-dir {params.derivatives:q} --prefix {wildcards.prefix:q} {params.mask:q} {params.lesion:q}"
        " --source-dir {params.source:q}"
        " --b0-threshold {params.pre[b0_threshold]:q} --denoise {params.pre[denoise]:q}"
        " {params.gibbs:q} {params.motion:q}"
        " --features {params.pre[features]:q} --context {params.pre[context]:q}"
        " --context-radius {params.pre[context_radius]:q} --harmonisation {params.pre[harmonisation]:q}"
