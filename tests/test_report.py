"""The report's block of sampled clips: each clip's GIF and MP4 linked from the page, its prompt
as text, and a frame that says whether the oracle read every attribute right."""

import os
from html.parser import HTMLParser

import numpy as np

from diffusion.data import moving_shapes
from diffusion.evaluation import report
from diffusion.inference import video_files


class _Elements(HTMLParser):
    """Start tags with their attributes, and the page's text, as a browser would parse them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_clip_gallery_links_each_clips_files_and_marks_its_reading(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    prompts = ["a red circle moves up", "a <b>blue</b> square grows"]
    for index, prompt in enumerate(prompts):
        clip = moving_shapes.render_clip("circle", "red", "small", "up", "slow", "black", rng)
        files = video_files.write_clip_files(str(tmp_path / "clips"), f"{index:05d}", clip, 8)
        items.append(
            {
                "prompt": prompt,
                **{kind: os.path.relpath(path, tmp_path) for kind, path in files.items()},
                "correct": {"shape": True, "motion": index == 0},
            }
        )
    page = _Elements()
    page.feed(report.clip_gallery_html({"title": "test_unseen", "items": items}))

    images = [attrs for tag, attrs in page.tags if tag == "img"]
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a"]
    assert [image["src"] for image in images] == [item["gif"] for item in items]
    assert links == [item["mp4"] for item in items]
    for path in [*links, *(image["src"] for image in images)]:
        assert os.path.isfile(tmp_path / path), path
    # Green frame only where every attribute was read right.
    assert [image["class"] for image in images] == ["ok", "bad"]
    # Prompts are text, never markup: no <b> element, the angle brackets shown as typed.
    assert "b" not in [tag for tag, _ in page.tags]
    assert prompts[1] in "".join(page.text)
