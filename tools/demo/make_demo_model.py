"""Makes models/demo: a tiny random-weight Llama (the llama test fixture's weights, vocab 512)
with a real byte-level BPE tokenizer.json trained here and a ChatML chat template, so that
`kiln run --prompt` and `kiln chat` have something to run without downloads. The weights are
random: the text it writes is gibberish by design. Needs the `tokenizers` package (tests venv).

    .venv/bin/python tools/demo/make_demo_model.py
"""
import json
import pathlib
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

root = pathlib.Path(__file__).resolve().parents[2]
out = root / "models" / "demo"
src = root / "tests" / "fixtures" / "hf" / "llama"
out.mkdir(parents=True, exist_ok=True)

specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4; config: bos 1, eos 2
corpus = [p.read_text(encoding="utf-8") for p in sorted(root.glob("**/*.md"))
          if ".venv" not in p.parts and "build" not in p.parts[0]]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(corpus, trainer)
tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
assert tok.get_vocab_size() <= 512
tok.save(str(out / "tokenizer.json"))

chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
(out / "tokenizer_config.json").write_text(json.dumps({
    "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
    "add_bos_token": True, "chat_template": chatml,
    "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
for f in ["config.json", "model.safetensors"]:
    shutil.copy(src / f, out / f)
gen = json.loads((src / "generation_config.json").read_text())
gen["eos_token_id"] = [2, 4]
(out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
print("wrote", out)
