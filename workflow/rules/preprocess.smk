# Validate and preprocess every scan (dipy): brain mask, denoising, S/S0, q-space features.


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        **PREPROCESS_OUTPUTS,
    log:
        LOGS / "preprocess" / "{subdir}" / "{prefix}.log",
    benchmark:
        benchmark_file("preprocess", "{subdir}", "{prefix}")
    wildcard_constraints:
        prefix=prefix_regex([p for p in SCANS if p not in COPIED]),
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
        copies=lambda wc: copy_flags(wc.prefix),
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} preprocess'
        " --dwi {input.dwi:q} --bval {input.bval:q} --bvec {input.bvec:q}"
        " --output-dir {params.derivatives:q} --prefix {wildcards.prefix:q} {params.mask:q} {params.lesion:q}"
        " --source-dir {params.source:q}"
        " --b0-threshold {params.pre[b0_threshold]:q} --denoise {params.pre[denoise]:q}"
        " {params.gibbs:q} {params.motion:q}"
        " --features {params.pre[features]:q} --context {params.pre[context]:q}"
        " --context-radius {params.pre[context_radius]:q} --harmonisation {params.pre[harmonisation]:q}"
        " {params.copies:q}"


use rule preprocess as preprocess_control with:
    # A control and its copies (training.*_augmentation), each preprocessed like it within its brain mask: the fold
    # models learn healthy tissue across the SNR and diffusivities of a cohort, and the null is noise-matched.
    output:
        **PREPROCESS_OUTPUTS,
        copies=[copy_pattern(c, suffix) for c in TRAINING_COPIES for suffix in PREPROCESS_SUFFIXES.values()],
    wildcard_constraints:
        prefix=prefix_regex(COPIED),
    resources:
        mem_mb=measured_mem_mb(158, 12.2),  # the larger slope of the scan and its copies (a copy adds noise first)
        runtime=30 * (1 + len(TRAINING_COPIES)),
