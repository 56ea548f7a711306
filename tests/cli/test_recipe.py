"""Recipes: validated against the stage configs before any work; errors name file, line, key."""


import pytest

from nsn_cli.stages.config import STAGE_CONFIGS
from nsn_cli.errors import UsageError
from nsn_cli.cli.recipe import build_config, load_recipe
from tests.helpers import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.toml"))


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.stages["convert"]["model"]
    for stage, values in recipe.stages.items():
        build_config(stage, values, out_dir="x", project="x")  # every key accepted


def test_shipped_recipes_found():
    assert {p.name for p in RECIPES} >= {"demo.toml"} or not RECIPES


def test_top_level_keys_feed_stages(tmp_path):
    recipe = load_recipe(write(tmp_path, 'model = "m"\ntask = "seq-cls"\n[convert]\ntargets = "attn"\n'))
    assert recipe.stages["convert"] == {"model": "m", "task": "seq-cls", "targets": "attn"}
    assert len(recipe.sha256) == 64 and recipe.name == "r"


@pytest.mark.parametrize("text,needle", [
    ('model = "m"\n[convert]\ntargetz = "all"\n', "r.toml:3: convert.targetz: unknown key"),
    ('model = "m"\n\n[convert]\nmax_rank = "big"\n', "r.toml:4: convert.max_rank: wrong type"),
    ('model = "m"\n[convert]\nforce = true\n', "convert.force: unknown key"),
    ('[convert]\ntargets = "all"\n', "model: missing"),
    ('model = "m"\ncolour = 1\n', "r.toml:2: colour: unknown key"),
    ('model = "m"\n[bogus]\nx = 1\n', "unknown stage table [bogus]"),
    ('model = = "m"\n', "not valid TOML"),
    ('model = "m"\n[finetune]\nprecision = "bf16"\n', "r.toml:3: finetune.precision: renamed to dtype"),
    ('model = "m"\n[profile]\nwarmup = 1\n', "r.toml:3: profile.warmup: renamed to warmup_passes"),
    ('model = "m"\n[convert]\nsvd = "fast"\n', "convert.svd: 'fast' is not one of auto, exact, "
                                               "randomized"),
    ('model = "m"\n[finetune]\ndtype = "bf16"\n', "finetune.dtype: 'bf16' is not one of"),
])
def test_broken_recipes_name_file_line_and_key(tmp_path, text, needle):
    with pytest.raises(UsageError) as info:
        load_recipe(write(tmp_path, text))
    assert needle in str(info.value)


def test_overrides(tmp_path):
    path = write(tmp_path, 'model = "m"\n[convert]\nmax_rank = 8\n')
    recipe = load_recipe(path, ["convert.max_rank=4", "convert.targets=mlp"])
    assert recipe.stages["convert"]["max_rank"] == 4 and recipe.stages["convert"]["targets"] == "mlp"
    with pytest.raises(UsageError, match="wrong type"):
        load_recipe(path, ["convert.max_rank=1.5"])
    with pytest.raises(UsageError, match="stage.key=value"):
        load_recipe(path, ["nonsense"])


def test_stage_tables_cover_registered_configs(tmp_path):
    recipe = load_recipe(write(tmp_path, 'model = "m"\n'))
    assert set(recipe.stages) == {s for s in ("convert", "finetune", "profile", "frontier")
                                  if s in STAGE_CONFIGS}
