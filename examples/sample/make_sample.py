"""Regenerate examples/sample from files that installed packages ship (scikit-image, scikit-learn, matplotlib).

    python examples/sample/make_sample.py

Writes the photos (resized, some cropped tall or wide so tiling sees many aspect ratios), short H.264 videos made
from them with PyAV, the chat JSONL files of the four sample kinds with their meta JSON, a preference JSONL (DPO /
MPO) with its own meta JSON, GRPO prompt lines with answers and their meta JSON, and the same photos as a
mini retrieval / caption set in the COCO-Karpathy, Flickr30K and NoCaps layouts (copies of images/ under the names
those layouts use; git stores identical files once). Captions and answers are our own. Output is deterministic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
LONGEST_SIDE = 448
JPEG_QUALITY = 85


def _skimage(name):
    import skimage.data

    return lambda: getattr(skimage.data, name)()


def _sklearn(name):
    def load():
        import sklearn.datasets

        return np.asarray(Image.open(Path(sklearn.datasets.__file__).parent / "images" / name))

    return load


def _matplotlib(name):
    def load():
        import matplotlib

        return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name))

    return load


# name: (loader, crop box as fractions (left, top, right, bottom) or None, source, license)
PHOTOS = {
    "astronaut": (_skimage("astronaut"), None, "scikit-image `skimage.data.astronaut` (NASA)", "public domain"),
    "chelsea": (_skimage("chelsea"), None, "scikit-image `skimage.data.chelsea` (Stefan van der Walt)", "CC0"),
    "coffee": (_skimage("coffee"), None, "scikit-image `skimage.data.coffee` (Rachel Michetti)", "CC0"),
    "rocket": (_skimage("rocket"), (0.33, 0.0, 0.62, 1.0), "scikit-image `skimage.data.rocket` (SpaceX), cropped tall",
               "public domain"),
    "camera": (_skimage("camera"), None, "scikit-image `skimage.data.camera` (Lav Varshney), grayscale", "CC0"),
    "hubble": (_skimage("hubble_deep_field"), (0.0, 0.35, 1.0, 0.6),
               "scikit-image `skimage.data.hubble_deep_field` (NASA), cropped to a wide strip", "public domain"),
    "retina": (_skimage("retina"), None, "scikit-image `skimage.data.retina` (Mikael Häggström)", "CC0"),
    "ihc": (_skimage("immunohistochemistry"), (0.0, 0.5, 1.0, 1.0),
            "scikit-image `skimage.data.immunohistochemistry` (CMMI), cropped wide", "no known copyright restrictions"),
    "brick": (_skimage("brick"), (0.3, 0.0, 0.7, 1.0), "scikit-image `skimage.data.brick` (CC0Textures), cropped tall",
              "CC0"),
    "coins": (_skimage("coins"), None, "scikit-image `skimage.data.coins` (Brooklyn Museum)",
              "no known copyright restrictions"),
    "china": (_sklearn("china.jpg"), None, "scikit-learn `sklearn/datasets/images/china.jpg` (danielbuechele, Flickr)",
              "CC BY 2.0"),
    "flower": (_sklearn("flower.jpg"), (0.15, 0.0, 0.65, 1.0),
               "scikit-learn `sklearn/datasets/images/flower.jpg` (vultilion, Flickr), cropped tall", "CC BY 2.0"),
    "grace_hopper": (_matplotlib("grace_hopper.jpg"), None,
                     "matplotlib `sample_data/grace_hopper.jpg` (U.S. Navy portrait)", "public domain"),
}

# Five English and five Chinese captions per photo, written for this sample.
CAPTIONS = {
    "astronaut": (
        ["A smiling astronaut in an orange flight suit poses in front of an American flag.",
         "A woman astronaut in an orange suit stands beside a model of the space shuttle.",
         "An official portrait of an astronaut holding a white helmet.",
         "A woman with short hair wearing an orange pressure suit with mission patches.",
         "An astronaut portrait with a flag on the left and a shuttle model on the right."],
        ["一位身穿橙色飞行服的宇航员在美国国旗前微笑。",
         "一名女宇航员身穿橙色宇航服，站在航天飞机模型旁边。",
         "一张宇航员手拿白色头盔的官方肖像照。",
         "一位短发女性穿着带任务徽章的橙色压力服。",
         "宇航员肖像，左边是国旗，右边是航天飞机模型。"],
    ),
    "chelsea": (
        ["A close-up of a tabby cat looking at the camera with green eyes.",
         "The face of a striped cat with long white whiskers.",
         "A brown tabby cat staring straight ahead.",
         "A cat with yellow-green eyes and a pink nose.",
         "Close view of a young cat's head and ears."],
        ["一只虎斑猫用绿色的眼睛看着镜头的特写。",
         "一只长着白色长胡须的条纹猫的脸。",
         "一只棕色虎斑猫直视前方。",
         "一只黄绿色眼睛、粉色鼻子的猫。",
         "一只小猫头部和耳朵的近景。"],
    ),
    "coffee": (
        ["A cup of espresso on a red saucer on a wooden table.",
         "A white coffee cup with a spoon resting on its saucer.",
         "Espresso served in a red and white cup seen from above.",
         "A small cup of coffee on a wooden bar counter.",
         "A coffee cup and saucer with a metal teaspoon."],
        ["木桌上红色碟子里放着一杯意式浓缩咖啡。",
         "一个白色咖啡杯，碟子上放着一把勺子。",
         "从上方看到的红白相间杯子里的浓缩咖啡。",
         "木质吧台上的一小杯咖啡。",
         "一个咖啡杯和碟子，旁边有一把金属茶匙。"],
    ),
    "rocket": (
        ["A rocket stands on the launch pad at dusk.",
         "A tall white rocket lit by floodlights before launch.",
         "A launch tower next to a rocket under a deep blue sky.",
         "A rocket ready for launch with bright lights at its base.",
         "A white rocket pointing at the evening sky."],
        ["黄昏时分，一枚火箭矗立在发射台上。",
         "发射前被探照灯照亮的高大白色火箭。",
         "深蓝色天空下，发射塔旁边的一枚火箭。",
         "一枚准备发射的火箭，底部灯光明亮。",
         "一枚指向傍晚天空的白色火箭。"],
    ),
    "camera": (
        ["A black and white photo of a man filming with a camera on a tripod.",
         "A photographer in a dark coat looks through a camera on a grass field.",
         "A man operating a camera on a tripod with buildings far behind him.",
         "A grayscale picture of a cameraman standing on a lawn.",
         "A person bending over a tripod camera outdoors."],
        ["一张黑白照片，一名男子用三脚架上的相机拍摄。",
         "一位穿深色外套的摄影师在草地上透过相机观察。",
         "一名男子操作三脚架上的相机，远处是建筑物。",
         "一张摄影师站在草坪上的灰度照片。",
         "一个人在户外俯身对着三脚架上的相机。"],
    ),
    "hubble": (
        ["Many distant galaxies scattered across a black sky.",
         "A deep space image full of small colorful galaxies.",
         "Tiny points of light and galaxies in a dark field.",
         "A telescope view of countless faraway galaxies.",
         "A strip of the night sky crowded with galaxies."],
        ["黑色天空中散布着许多遥远的星系。",
         "一张满是彩色小星系的深空图像。",
         "黑暗背景中的微小光点和星系。",
         "望远镜拍摄的无数遥远星系。",
         "一条布满星系的夜空带。"],
    ),
    "retina": (
        ["A photograph of the back of a human eye showing blood vessels.",
         "An orange retina with branching red vessels and a bright optic disc.",
         "A round medical image of a healthy retina.",
         "The fundus of an eye with vessels spreading from the optic nerve.",
         "A circular eye scan on a black background."],
        ["一张显示血管的人眼底照片。",
         "橙色视网膜上有分叉的红色血管和明亮的视盘。",
         "一张健康视网膜的圆形医学图像。",
         "眼底图像，血管从视神经向外延伸。",
         "黑色背景上的圆形眼部扫描图。"],
    ),
    "ihc": (
        ["A microscope image of tissue stained brown and blue.",
         "Stained colon glands seen under a microscope.",
         "Brown stained cells surrounded by blue tissue.",
         "A histology slide with glands outlined in brown.",
         "Microscopic view of stained tissue samples."],
        ["一张被染成棕色和蓝色的组织显微图像。",
         "显微镜下看到的染色结肠腺体。",
         "被蓝色组织包围的棕色染色细胞。",
         "一张腺体轮廓呈棕色的组织切片。",
         "染色组织样本的显微视图。"],
    ),
    "brick": (
        ["A gray brick wall seen at an angle.",
         "Rows of bricks forming a wall.",
         "A close view of a brick wall texture.",
         "Gray bricks with light mortar lines.",
         "A section of a wall made of long bricks."],
        ["一面从斜角看到的灰色砖墙。",
         "一排排砖块组成的墙。",
         "砖墙纹理的近景。",
         "带有浅色灰缝的灰色砖块。",
         "一段由长砖砌成的墙。"],
    ),
    "coins": (
        ["Rows of old coins on a gray background.",
         "Ancient coins laid out in four rows.",
         "A black and white photo of many round coins.",
         "A collection of worn metal coins.",
         "Old coins arranged in a grid."],
        ["灰色背景上一排排的古钱币。",
         "排成四行的古代硬币。",
         "一张有许多圆形硬币的黑白照片。",
         "一组磨损的金属硬币。",
         "排列成网格的旧硬币。"],
    ),
    "china": (
        ["A red and green Chinese pagoda on a hill above a lake.",
         "A traditional tower surrounded by trees near the water.",
         "A pagoda with many roofs overlooking a river.",
         "A colorful temple tower on a sunny day.",
         "An old Chinese building with trees and a lake behind it."],
        ["湖边山上的一座红绿相间的中式宝塔。",
         "水边被树木环绕的传统塔楼。",
         "一座俯瞰河流的多层屋顶宝塔。",
         "晴天里一座色彩鲜艳的寺庙塔楼。",
         "一座古老的中式建筑，背后是树木和湖泊。"],
    ),
    "flower": (
        ["An orange dahlia in front of dark green leaves.",
         "A round orange flower with many petals.",
         "A dahlia in bloom with a second flower below it.",
         "A bright flower against a blurred green background.",
         "Close-up of an orange flower in a garden."],
        ["深绿色叶子前的一朵橙色大丽花。",
         "一朵有许多花瓣的圆形橙色花。",
         "一朵盛开的大丽花，下面还有一朵。",
         "模糊绿色背景前的一朵鲜艳的花。",
         "花园里一朵橙色花的特写。"],
    ),
    "grace_hopper": (
        ["An elderly woman in a navy uniform and cap poses in front of a flag.",
         "A portrait of a naval officer wearing glasses and ribbons.",
         "A woman in a dark uniform with medals on her chest.",
         "An official portrait of an officer with an American flag behind her.",
         "A smiling older woman wearing a navy hat."],
        ["一位身穿海军制服、头戴帽子的老年女性在国旗前留影。",
         "一位戴眼镜、佩戴勋表的海军军官肖像。",
         "一位胸前佩戴奖章、身穿深色制服的女性。",
         "一张身后有美国国旗的军官官方肖像。",
         "一位戴着海军帽微笑的老年女性。"],
    ),
}

TEST_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "china", "grace_hopper"]
VAL_PHOTOS = ["brick", "coins"]
TRAIN_PHOTOS = ["camera", "hubble", "retina", "ihc", "flower"]

# Videos: (file, photo, motion, frames, size)
VIDEOS = [
    ("china_pan.mp4", "china", "pan", 24, (192, 160)),
    ("coffee_zoom.mp4", "coffee", "zoom", 20, (224, 160)),
    ("rocket_tilt.mp4", "rocket", "tilt", 16, (128, 192)),
    ("chelsea_short.mp4", "chelsea", "pan", 6, (160, 128)),  # fewer frames than min_num_frame: all are used
]


def write_photos(out: Path) -> dict[str, tuple[int, int]]:
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, (load, crop, _, _) in PHOTOS.items():
        image = Image.fromarray(load())
        if crop is not None:
            w, h = image.size
            image = image.crop((round(crop[0] * w), round(crop[1] * h), round(crop[2] * w), round(crop[3] * h)))
        scale = LONGEST_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        image = image.convert("L" if image.mode in ("L", "I;16") else "RGB")
        image.save(out / f"{name}.jpg", quality=JPEG_QUALITY, optimize=True)
        sizes[name] = image.size
    return sizes


def write_video(path: Path, photo: Path, motion: str, frames: int, size: tuple[int, int]) -> None:
    import av

    image = Image.open(photo).convert("RGB")
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "30", "preset": "veryslow"}
        for t in np.linspace(0.0, 1.0, frames):
            if motion == "zoom":
                f = 1.0 - 0.5 * t
                cw, ch = image.width * f, image.height * f
                box = ((image.width - cw) / 2, (image.height - ch) / 2, (image.width + cw) / 2, (image.height + ch) / 2)
            else:  # a window with the video's aspect ratio, 80 % of the photo's limiting side
                cw = 0.8 * min(image.width, image.height * w / h)
                ch = cw * h / w
                if motion == "pan":
                    box = (t * (image.width - cw), (image.height - ch) / 2, t * (image.width - cw) + cw, (image.height + ch) / 2)
                else:  # tilt: bottom to top
                    top = (1 - t) * (image.height - ch)
                    box = ((image.width - cw) / 2, top, (image.width + cw) / 2, top + ch)
            frame = image.resize((w, h), Image.Resampling.BICUBIC, box=box)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": i, **row}, ensure_ascii=False) + "\n")


def chat_files(out: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, int]:
    def en(name, k=0):
        return CAPTIONS[name][0][k]

    def zh(name, k=0):
        return CAPTIONS[name][1][k]

    def conv(*turns):
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]

    text = [
        {"conversations": conv("What is the capital of France?", "The capital of France is Paris.")},
        {"conversations": conv("法国的首都是哪里？", "法国的首都是巴黎。")},
        {"conversations": conv("Give me two tips for taking sharp photos.",
                               "Hold the camera steady, ideally on a tripod, and use a fast enough shutter speed.",
                               "And at night?",
                               "Use a tripod and a longer exposure, and keep the ISO low to limit noise.")},
        {"conversations": conv("Write a haiku about coffee.",
                               "Dark cup, morning steam\nbitter warmth against the cold\nthe day starts to wake")},
        {"conversations": conv("把这句话翻译成英文：今天天气很好。", "The weather is very nice today.")},
        {"conversations": conv("How many legs does a cat have?", "A cat has four legs.")},
    ]
    single = []
    questions = [
        ("Describe this image in one sentence.", "用一句话描述这张图片。"),
        ("What is shown in the picture?", "图片里有什么？"),
    ]
    for k, name in enumerate(PHOTOS):
        w, h = sizes[name]
        english = k % 2 == 0
        q = questions[k % 2][0 if english else 1]
        a = en(name) if english else zh(name)
        # Every third line leaves out <image>: the loader prepends it, as the reference does.
        value = q if k % 3 == 2 else f"<image>\n{q}"
        single.append({"image": f"{name}.jpg", "width": w, "height": h, "conversations": conv(value, a)})
    w, h = sizes["astronaut"]
    single.append({"image": "astronaut.jpg", "width": w, "height": h, "conversations": conv(
        "<image>\nWhere is the helmet in the image?",
        "<ref>the helmet</ref><box>[[566, 680, 1000, 1000]]</box>",
        "What is the person wearing?",
        "She is wearing an orange flight suit with mission patches on it.",
    )})
    multi = []
    for names, q, a in [
        (["chelsea", "coffee"], "<image>\n<image>\nWhat is in each of the two images?",
         f"The first image shows a cat: {en('chelsea', 2).lower()} The second shows coffee: {en('coffee', 0).lower()}"),
        (["rocket", "astronaut", "hubble"], "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nWhat do these images have in common?",
         "All three are about space: a rocket on its launch pad, an astronaut, and distant galaxies."),
        (["china", "flower"], "<image>\n<image>\n这两张图片分别是什么？", f"第一张：{zh('china', 0)}第二张：{zh('flower', 0)}"),
    ]:
        multi.append({"image": [f"{n}.jpg" for n in names], "width_list": [sizes[n][0] for n in names],
                      "height_list": [sizes[n][1] for n in names], "conversations": conv(q, a)})
    multi.append({"image": ["camera.jpg", "grace_hopper.jpg"],
                  "width_list": [sizes["camera"][0], sizes["grace_hopper"][0]],
                  "height_list": [sizes["camera"][1], sizes["grace_hopper"][1]],
                  "conversations": conv("<image>\nWhat is this person doing?", "He is filming with a camera on a tripod.",
                                        "<image>\nAnd this one?", "She is posing for an official portrait in a navy uniform.")})
    video = [
        {"video": "china_pan.mp4", "conversations": conv("<video>\nDescribe what the camera shows.",
                                                         "The camera pans across a Chinese pagoda on a hill above a lake.")},
        {"video": "coffee_zoom.mp4", "conversations": conv("What happens in this video?",
                                                           "The view zooms in on a cup of espresso on a red saucer.")},
        {"video": "rocket_tilt.mp4", "conversations": conv("<video>\n视频里是什么？", "视频从下往上展示了发射台上的一枚火箭。")},
        {"video": "chelsea_short.mp4", "conversations": conv("<video>\nWhat animal is this?", "It is a tabby cat.",
                                                             "What colour are its eyes?", "Its eyes are green.")},
    ]
    files = {"text.jsonl": text, "image.jsonl": single, "multi_image.jsonl": multi, "video.jsonl": video}
    for name, rows in files.items():
        jsonl(out / name, rows)
    return {name: len(rows) for name, rows in files.items()}


def write_meta(out: Path, counts: dict[str, int]) -> None:
    meta = {
        "sample_text": {"root": "images/", "annotation": "text.jsonl", "data_augment": False, "repeat_time": 1,
                        "length": counts["text.jsonl"]},
        "sample_image": {"root": "images/", "annotation": "image.jsonl", "data_augment": True, "repeat_time": 1,
                         "length": counts["image.jsonl"]},
        "sample_multi_image": {"root": "images/", "annotation": "multi_image.jsonl", "data_augment": False,
                               "repeat_time": 2, "length": counts["multi_image.jsonl"], "max_dynamic_patch": 6},
        "sample_video": {"root": "videos/", "annotation": "video.jsonl", "data_augment": False, "repeat_time": 1,
                         "length": counts["video.jsonl"]},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def preference_files(out: Path) -> None:
    """``preference.jsonl`` (DPO / MPO lines: question, chosen, rejected) over the photos, and its meta JSON."""
    rows = [
        {"image": "astronaut.jpg", "question": "<image>\nWhat colour is the astronaut's suit? Explain briefly.",
         "chosen": "The astronaut wears a flight suit that is clearly orange, with mission patches on it. "
                   "Final answer: orange.",
         "rejected": "Space suits are usually white, so the suit is white. Final answer: white."},
        {"image": "chelsea.jpg", "question": "What animal is in the picture?",
         "chosen": "It is a tabby cat looking at the camera.", "rejected": "It is a small dog lying on a sofa."},
        {"image": "coffee.jpg", "question": "<image>\n杯子里装的是什么？",
         "chosen": "杯子里是一杯浓缩咖啡，放在红色的碟子上。", "rejected": "杯子里是一杯绿茶。"},
        {"image": ["rocket.jpg", "astronaut.jpg"],
         "question": "<image>\n<image>\nWhich image shows a rocket, the first or the second?",
         "chosen": "The first image shows a rocket on its launch pad and the second an astronaut. "
                   "Final answer: the first.",
         "rejected": "The rocket is in the second image. Final answer: the second."},
        {"question": "What is 12 + 30? Think step by step.",
         "chosen": "12 + 30 = 42. Final answer: 42.", "rejected": "12 + 30 = 32. Final answer: 32."},
        {"question": "法国的首都是哪里？", "chosen": "法国的首都是巴黎。", "rejected": "法国的首都是里昂。"},
    ]
    jsonl(out / "preference.jsonl", rows)
    meta = {"sample_preference": {"root": "images/", "annotation": "preference.jsonl", "data_augment": False,
                                  "repeat_time": 1, "length": len(rows)}}
    (out / "preference_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def prompt_files(out: Path) -> None:
    """``prompts.jsonl`` / ``video_prompts.jsonl`` (GRPO / GSPO prompt lines with answers for the built-in rewards:
    a number, an option letter, a box, a word) over the photos and clips, and ``prompts_meta.json`` naming both."""
    def human(text):
        return [{"from": "human", "value": text}]

    rows = [
        {"image": "astronaut.jpg", "conversations": human("<image>\nWhat colour is the astronaut's suit? Answer with "
                                                           "one word."), "answer": "orange"},
        {"conversations": human("What is 12 + 30? Put the final answer in \\boxed{}.") +
         [{"from": "gpt", "value": "12 + 30 = 42, so the answer is \\boxed{42}."}]},
        {"image": ["rocket.jpg", "astronaut.jpg"],
         "conversations": human("<image>\n<image>\nWhich image shows a rocket?\n(A) the first\n(B) the second\n"
                                "Answer with the option's letter."), "answer": "A"},
        {"image": "astronaut.jpg", "conversations": human("<image>\nWhere is the helmet? Answer with its box."),
         "answer": "<ref>the helmet</ref><box>[[566, 680, 1000, 1000]]</box>"},
        {"image": "chelsea.jpg", "conversations": human("How many cats are in the picture? Think inside "
                                                        "<think></think> first, then answer with a number."),
         "solution": "1"},
        {"conversations": human("法国的首都是哪里？只回答城市名。"), "answer": "巴黎"},
    ]
    jsonl(out / "prompts.jsonl", rows)
    videos = [{"video": "chelsea_short.mp4", "conversations": human("<video>\nWhat animal is in the video? Answer "
                                                                    "with one word."), "answer": "cat"}]
    jsonl(out / "video_prompts.jsonl", videos)
    meta = {"sample_prompts": {"root": "images/", "annotation": "prompts.jsonl", "data_augment": False,
                               "repeat_time": 1, "length": len(rows)},
            "sample_video_prompts": {"root": "videos/", "annotation": "video_prompts.jsonl", "data_augment": False,
                                     "repeat_time": 1, "length": len(videos)}}
    (out / "prompts_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def link(target: Path, link_path: Path) -> None:
    """Copy a photo into a dataset layout (a copy, not a symlink, so any checkout works; git stores it once)."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(target, link_path)


def retrieval_sets(out: Path, sizes: dict[str, tuple[int, int]]) -> None:
    images = out / "images"
    ids = {name: 100 + k for k, name in enumerate(PHOTOS)}

    # COCO Karpathy: train is one entry per caption, test one entry per image with its caption list; GT in COCO format.
    coco = out / "coco"
    train_rows = []
    for name in TRAIN_PHOTOS + VAL_PHOTOS:
        file = f"train2014/COCO_train2014_{ids[name]:012d}.jpg"
        link(images / f"{name}.jpg", coco / file)
        train_rows += [{"caption": c, "image": file, "image_id": f"coco_{ids[name]}"} for c in CAPTIONS[name][0]]
    test_rows, gt_images, gt_annotations = [], [], []
    for name in TEST_PHOTOS:
        file = f"val2014/COCO_val2014_{ids[name]:012d}.jpg"
        link(images / f"{name}.jpg", coco / file)
        test_rows.append({"image": file, "caption": CAPTIONS[name][0]})
        gt_images.append({"id": ids[name], "file_name": file.split("/")[1], "width": sizes[name][0], "height": sizes[name][1]})
        gt_annotations += [{"image_id": ids[name], "id": len(gt_annotations) + k, "caption": c} for k, c in enumerate(CAPTIONS[name][0])]
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    _dump(coco / "annotations" / "coco_karpathy_train.json", train_rows)
    _dump(coco / "annotations" / "coco_karpathy_test.json", test_rows)
    _dump(coco / "annotations" / "coco_karpathy_test_gt.json", _coco_gt(gt_images, gt_annotations))

    # Flickr30K: clip_benchmark's `image,caption` text files (numeric names), the test split also as COCO-style JSON.
    flickr = out / "flickr30k"
    fid = {name: 1000000 + ids[name] for name in PHOTOS}
    for name in PHOTOS:
        link(images / f"{name}.jpg", flickr / "Images" / f"{fid[name]}.jpg")
    for split, names in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS), ("test", TEST_PHOTOS)):
        _caption_txt(flickr / f"flickr30k_{split}_karpathy.txt", [(f"{fid[n]}.jpg", CAPTIONS[n][0]) for n in names])
    for split, names in (("train", TRAIN_PHOTOS + VAL_PHOTOS), ("test", TEST_PHOTOS)):
        _caption_txt(flickr / f"flickr30k_cn_{split}.txt", [(f"{fid[n]}.jpg", CAPTIONS[n][1]) for n in names])
    f_images = [{"id": fid[n], "file_name": f"Images/{fid[n]}.jpg", "width": sizes[n][0], "height": sizes[n][1]} for n in TEST_PHOTOS]
    f_annotations = [{"image_id": fid[n], "id": i * 5 + k, "caption": c}
                     for i, n in enumerate(TEST_PHOTOS) for k, c in enumerate(CAPTIONS[n][0])]
    _dump(flickr / "flickr30k_test_karpathy.json", _coco_gt(f_images, f_annotations))

    # NoCaps val: COCO-style JSON whose images live in nocaps/images/ (Open Images style hex names).
    nocaps = out / "nocaps"
    n_images, n_annotations = [], []
    for k, name in enumerate(TEST_PHOTOS):
        file = f"{ids[name] * 7919:016x}.jpg"
        link(images / f"{name}.jpg", nocaps / "images" / file)
        n_images.append({"id": k, "file_name": file, "width": sizes[name][0], "height": sizes[name][1],
                         "domain": ("in-domain", "near-domain", "out-domain")[k % 3]})
        n_annotations += [{"image_id": k, "id": len(n_annotations) + j, "caption": c} for j, c in enumerate(CAPTIONS[name][0])]
    _dump(nocaps / "nocaps_val_4500_captions.json", _coco_gt(n_images, n_annotations))


def _coco_gt(images: list[dict], annotations: list[dict]) -> dict:
    return {"info": {"description": "internvl-tune sample"}, "licenses": [], "type": "captions",
            "images": images, "annotations": annotations}


def _caption_txt(path: Path, rows: list[tuple[str, list[str]]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("image,caption\n")
        for file, captions in rows:
            f.writelines(f"{file},{c}\n" for c in captions)


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main(out: Path = HERE) -> None:
    for sub in ("images", "videos", "coco", "flickr30k", "nocaps"):
        shutil.rmtree(out / sub, ignore_errors=True)
    sizes = write_photos(out / "images")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for file, photo, motion, frames, size in VIDEOS:
        write_video(out / "videos" / file, out / "images" / f"{photo}.jpg", motion, frames, size)
    write_meta(out, chat_files(out, sizes))
    preference_files(out)
    prompt_files(out)
    retrieval_sets(out, sizes)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
