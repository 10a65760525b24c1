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
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        pre=config["preprocessing"],
        mask=lambda wc, input: optional_flag("--mask", input, "mask"),
        lesion=lambda wc, input: optional_flag("--lesion-mask", input, "lesion"),
        gibbs="--gibbs-removal" if config["preprocessing"]["gibbs_removal"] else "--no-gibbs-removal",
        motion="--motion-correction" if config["preprocessing"]["motion_correction"] else "--no-motion-correction",
    shell:
        "{ANOMRI} --log {log} preprocess --dwi {input.dwi} --bval {input.bval} --bvec {input.bvec}"
        " --output-dir {OUT} --prefix {wildcards.prefix} {params.mask} {params.lesion}"
        " --b0-threshold {params.pre[b0_threshold]} --denoise {params.pre[denoise]}"
        " {params.gibbs} {params.motion}"
        " --features {params.pre[features]} --context {params.pre[context]}"
        " --context-radius {params.pre[context_radius]}"
