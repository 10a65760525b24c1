# The 2-D image engine (issue #5): target `images` (snakemake --cores all images).
# Train -> score (maps) -> evaluate -> report (figures, overlays), on an MVTec-layout folder
# (`images_root`), or on the synthetic OCT-like demo set when none is given.
# Thin rules only: each calls one `anomri` command.
from anomri.images.outputs import ImageOutputs
from anomri.images.settings import (
    ALL_METHODS,
    FUSION_METHOD,
    METHODS,
    MODEL_OF_METHOD,
    ImageSettings,
    fused_methods,
)

IMAGES = ImageOutputs(OUT / "images")
IMAGES_ROOT = Path(config["images_root"]) if config.get("images_root") else IMAGES.demo
IMAGE_METHODS = list(ALL_METHODS) if config.get("image_methods", "all") == "all" else list(config["image_methods"])
if set(IMAGE_METHODS) - set(ALL_METHODS):
    raise WorkflowError(
        f"anomri: error: config: image_methods {sorted(set(IMAGE_METHODS) - set(ALL_METHODS))} "
        f"unknown; known: {', '.join(ALL_METHODS)}"
    )
if config.get("images_layout", "mvtec") != "mvtec":
    raise WorkflowError(f"anomri: error: config: images_layout {config['images_layout']!r} unsupported; use mvtec")
IMAGE_CONFIG = config.get("images", {})
# What `demo-images` takes; the demo's `oct_band` is a model setting instead.
DEMO_OPTIONS = {k: v for k, v in IMAGE_CONFIG.get("demo", {}).items() if k != "oct_band"}
_image_settings = {k: v for k, v in IMAGE_CONFIG.items() if k not in ("device", "demo", "threads")}
if not config.get("images_root") and "oct_band" in IMAGE_CONFIG.get("demo", {}):
    # The demo images are OCT B-scans: they get the demo's band handling, a user's folder images.oct_band.
    _image_settings["oct_band"] = IMAGE_CONFIG["demo"]["oct_band"]
IMAGE_SETTINGS = json.dumps(_image_settings)
# The methods whose maps and those whose image scores method `fusion` fuses (scored whether or not image_methods
# lists them).
MAP_FUSED_METHODS = IMAGE_CONFIG.get("map_fusion_methods", ImageSettings().map_fusion_methods)
SCORE_FUSED_METHODS = IMAGE_CONFIG.get("score_fusion_methods", ImageSettings().score_fusion_methods)
FUSED_METHODS = fused_methods(MAP_FUSED_METHODS, SCORE_FUSED_METHODS)
IMAGE_DEVICE = IMAGE_CONFIG.get("device", "auto")
# A fixed count, not workflow.cores: a cluster run has no total core count. The rules pass it to
# `anomri --threads` (torch, BLAS/OpenMP).
IMAGE_THREADS = IMAGE_CONFIG.get("threads", 2)
# The image rules' mem_mb are estimates, not yet measured (their benchmark files record the real peaks).
# The demo folder is an output to wait for; a user's folder is simply read.
IMAGES_ROOT_INPUT = [] if config.get("images_root") else [IMAGES.demo]


wildcard_constraints:
    image_method="|".join(METHODS),
    image_model="|".join(sorted(set(MODEL_OF_METHOD.values()))),


if not config.get("images_root"):

    rule images_demo:
        output:
            directory(IMAGES.demo),
        log:
            LOGS / "images" / "demo.log",
        benchmark:
            benchmark_file("images_demo")
        conda:
            "../envs/anomri.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        params:
            demo=option_args(DEMO_OPTIONS),
        shell:
            '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} demo-images {output:q} {params.demo:q}'


rule images_train:
    input:
        IMAGES_ROOT_INPUT,
    output:
        model=IMAGES.model("{image_model}"),
        history=report(
            IMAGES.history("{image_model}"),
            caption="../report/images_history.rst",
            category="Images",
            subcategory="Training",
        ),
    log:
        LOGS / "images" / "train_{image_model}.log",
    benchmark:
        benchmark_file("images_train", "{image_model}")
    conda:
        "../envs/anomri.yaml"
    threads: IMAGE_THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1 if IMAGE_DEVICE == "cuda" else 0,
    params:
        root=IMAGES_ROOT,
        settings=IMAGE_SETTINGS,
        device=IMAGE_DEVICE,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} images-train'
        " --root {params.root:q} --model {wildcards.image_model:q}"
        " --out {output.model:q} --history {output.history:q} --settings {params.settings:q}"
        " --device {params.device:q}"


rule images_score:
    input:
        IMAGES_ROOT_INPUT,
        model=lambda w: IMAGES.model(MODEL_OF_METHOD[w.image_method]),
    output:
        maps=directory(IMAGES.maps("{image_method}")),
        validation_maps=directory(IMAGES.validation_maps("{image_method}")),
        scores=IMAGES.scores("{image_method}"),
        thresholds=IMAGES.thresholds("{image_method}"),
    log:
        LOGS / "images" / "score_{image_method}.log",
    benchmark:
        benchmark_file("images_score", "{image_method}")
    conda:
        "../envs/anomri.yaml"
    threads: IMAGE_THREADS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1 if IMAGE_DEVICE == "cuda" else 0,
    params:
        root=IMAGES_ROOT,
        images_dir=IMAGES.root,
        settings=IMAGE_SETTINGS,
        device=IMAGE_DEVICE,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} images-score'
        " --root {params.root:q} --method {wildcards.image_method:q}"
        " --model {input.model:q} --images-dir {params.images_dir:q} --settings {params.settings:q}"
        " --device {params.device:q}"


rule images_fuse:
    input:
        maps=[IMAGES.maps(m) for m in MAP_FUSED_METHODS],
        validation_maps=[IMAGES.validation_maps(m) for m in MAP_FUSED_METHODS],
        scores=[IMAGES.scores(m) for m in FUSED_METHODS],
        thresholds=[IMAGES.thresholds(m) for m in FUSED_METHODS],
    output:
        maps=directory(IMAGES.maps(FUSION_METHOD)),
        validation_maps=directory(IMAGES.validation_maps(FUSION_METHOD)),
        scores=IMAGES.scores(FUSION_METHOD),
        thresholds=IMAGES.thresholds(FUSION_METHOD),
    log:
        LOGS / "images" / "fuse.log",
    benchmark:
        benchmark_file("images_fuse")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        images_dir=IMAGES.root,
        settings=IMAGE_SETTINGS,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} images-fuse'
        " --images-dir {params.images_dir:q} --settings {params.settings:q}"


rule images_evaluate:
    input:
        IMAGES_ROOT_INPUT,
        [IMAGES.maps(m) for m in IMAGE_METHODS],
        [IMAGES.scores(m) for m in IMAGE_METHODS],
        [IMAGES.thresholds(m) for m in IMAGE_METHODS],
    output:
        scores=report(
            IMAGES.image_scores, caption="../report/images_scores.rst", category="Images", subcategory="Tables"
        ),
        evaluation=report(
            IMAGES.evaluation, caption="../report/images_evaluation.rst", category="Images", subcategory="Tables"
        ),
        curves=IMAGES.curves,
    log:
        LOGS / "images" / "evaluate.log",
    benchmark:
        benchmark_file("images_evaluate")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=12000,
        runtime=60,
    params:
        root=IMAGES_ROOT,
        images_dir=IMAGES.root,
        methods=IMAGE_METHODS,
        settings=IMAGE_SETTINGS,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} images-evaluate'
        " --root {params.root:q} --methods {params.methods:q}"
        " --images-dir {params.images_dir:q} --settings {params.settings:q}"


rule images_report:
    input:
        IMAGES_ROOT_INPUT,
        IMAGES.curves,
        [IMAGES.maps(m) for m in IMAGE_METHODS],
        [IMAGES.scores(m) for m in IMAGE_METHODS],
    output:
        roc=report(IMAGES.roc_figure, caption="../report/images_roc.rst", category="Images", subcategory="Curves"),
        examples=[
            report(
                IMAGES.examples_figure(m),
                caption="../report/images_examples.rst",
                category="Images",
                subcategory="Examples",
                labels={"method": m},
            )
            for m in IMAGE_METHODS
        ],
        overlays=[directory(IMAGES.overlays(m)) for m in IMAGE_METHODS],
    log:
        LOGS / "images" / "report.log",
    benchmark:
        benchmark_file("images_report")
    conda:
        "../envs/anomri.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        root=IMAGES_ROOT,
        images_dir=IMAGES.root,
        methods=IMAGE_METHODS,
        settings=IMAGE_SETTINGS,
    shell:
        '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} images-report --root {params.root:q} --methods {params.methods:q}'
        " --images-dir {params.images_dir:q} --settings {params.settings:q}"


rule images:
    input:
        IMAGES.evaluation,
        IMAGES.roc_figure,
        [IMAGES.examples_figure(m) for m in IMAGE_METHODS],
        [IMAGES.overlays(m) for m in IMAGE_METHODS],
