# Validate and preprocess every scan (dipy): brain mask, denoising, S/S0, q-space features.


def preprocess_inputs(wildcards):
    scan = SCANS[wildcards.prefix]
    inputs = {"dwi": scan.dwi, "bval": scan.bval, "bvec": scan.bvec}
    if scan.brain_mask:
        inputs["mask"] = scan.brain_mask
    if scan.lesion_mask:
        inputs["lesion"] = scan.lesion_mask
    return inputs


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        mask=scan_pattern("desc-brain_mask.nii.gz"),
        b0=scan_pattern("dwiref.nii.gz"),
        features=scan_pattern("desc-qspace_features.nii.gz"),
        sidecar=scan_pattern("desc-qspace_features.json"),
    log:
        LOGS / "preprocess" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("preprocess", "{subdir}", "{prefix}"),
    threads: 1
    resources:
        mem_mb=1000,  # 1.5x peak RSS 585 MB on the demo cohort, 12 jobs
        runtime=30,
    params:
        derivatives=OUT,
        pre=config["preprocessing"],
        mask=lambda wc, input: optional_flag("--mask", input, "mask"),
        lesion=lambda wc, input: optional_flag("--lesion-mask", input, "lesion"),
        gibbs="--gibbs-removal" if config["preprocessing"]["gibbs_removal"] else "--no-gibbs-removal",
        motion="--motion-correction" if config["preprocessing"]["motion_correction"] else "--no-motion-correction",
    shell:
        "{ANOMRI} --log {log:q} --threads {threads:q} preprocess"
        " --dwi {input.dwi:q} --bval {input.bval:q} --bvec {input.bvec:q}"
        " --output-dir {params.derivatives:q} --prefix {wildcards.prefix:q} {params.mask:q} {params.lesion:q}"
        " --b0-threshold {params.pre[b0_threshold]:q} --denoise {params.pre[denoise]:q}"
        " {params.gibbs:q} {params.motion:q}"
        " --features {params.pre[features]:q} --context {params.pre[context]:q}"
        " --context-radius {params.pre[context_radius]:q}"
