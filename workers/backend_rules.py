"""What each backend can run, decided from a GGUF header alone: no backend library is imported here.

`workers.backends` asks these rules for the backends a node does not run, so that a refusal can name the one
that is missing ("architecture qwen2 needs the llama-cpp backend").
"""

from gguf.constants import GGMLQuantizationType as Q

from workers.gguf_info import GGUFInfo

CTRANSFORMERS_ARCHITECTURES = frozenset({"llama"})
"""ctransformers 0.2.27's llama.cpp (September 2023) runs GGUF only as llama (Mistral files say llama too). A
`qwen2` file fails with "Failed to create LLM 'llama'"."""
_CTRANSFORMERS_TYPES = [Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q8_1]
_CTRANSFORMERS_TYPES += [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K]
CTRANSFORMERS_TENSOR_TYPES = frozenset(int(t) for t in _CTRANSFORMERS_TYPES)
"""The ggml types its ggml computes with; the IQ* types, BF16, the ternary and FP4 types came later."""
CTRANSFORMERS_TOKENIZERS = frozenset({"llama"})
"""SentencePiece only. It refuses a llama file with a byte-level BPE vocabulary (Llama 3's kind): measured, the
load fails like an unknown architecture; and it predates the BPE pre-tokenizers (`tokenizer.ggml.pre`)."""

# fmt: off
LLAMA_CPP_ARCHITECTURES = frozenset(
    {
        "llama", "llama4", "deci", "falcon", "grok", "gpt2", "gptj", "gptneox", "mpt", "baichuan", "starcoder",
        "refact", "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
        "jina-bert-v3", "eurobert", "bloom", "stablelm", "qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3",
        "qwen3moe", "qwen3next", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen4exp", "phi2", "phi3",
        "phimoe", "plamo", "plamo2", "plamo3", "codeshell", "orion", "internlm2", "minicpm", "minicpm3",
        "gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma4-assistant", "gemma-embedding", "starcoder2",
        "mamba", "mamba2", "maple", "jamba", "falcon-h1", "xverse", "command-r", "cohere2", "cohere2moe",
        "dbrx", "olmo", "olmo2", "olmoe", "muse-glimmer", "openelm", "arctic", "deepseek", "deepseek2",
        "deepseek2-ocr", "deepseek32", "deepseek4", "chatglm", "glm4", "glm4moe", "glm-dsa", "bitnet", "t5",
        "t5encoder", "jais", "jais2", "nemotron", "nemotron_h", "nemotron_h_moe", "exaone", "exaone4",
        "exaone-moe", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "granite", "granitemoe", "granitehybrid",
        "graniteswitch", "granite_swa", "chameleon", "wavtokenizer-dec", "plm", "bailingmoe", "bailingmoe2",
        "bailingmoe3", "dots1", "dots3note", "arcee", "afmoe", "laguna", "ernie4_5", "ernie4_5-moe",
        "hunyuan-moe", "hunyuan-dense", "hunyuan_vl", "hy_v3", "hy_v4", "smollm3", "gpt-oss", "lfm2", "lfm2moe",
        "dream", "smallthinker", "llada", "llada-moe", "seed_oss", "grovemoe", "apertus", "minimax-01",
        "hrm_text", "minimax-m2", "minimax-m3", "cogvlm", "rnd1", "pangu-embedded", "mistral3", "eagle3",
        "dflash", "mistral4", "paddleocr", "mimo2", "step35", "spark2_5", "llama-embed", "maincoder",
        "kimi-linear", "kimi-k3", "glm5-next", "talkie", "mellum", "nanbeige", "qwen3tts", "pockettts"
    }
)
# fmt: on
"""`LLM_ARCH_NAMES` of the llama.cpp in llama-cpp-python 0.3.36 (src/llama-arch.cpp), without `clip` (a vision
projector, not a model). Every ggml type `read_header` accepts is one this llama.cpp computes with."""


def ctransformers_problem(info: GGUFInfo) -> str | None:
    """What in the file ctransformers 0.2.27 cannot run, or None."""
    if info.architecture not in CTRANSFORMERS_ARCHITECTURES:
        return f"architecture {info.architecture}"
    if info.tokenizer_model is not None and info.tokenizer_model not in CTRANSFORMERS_TOKENIZERS:
        return f"a {info.tokenizer_model} (byte-level BPE) vocabulary"
    newer = info.tensor_types - CTRANSFORMERS_TENSOR_TYPES
    if newer:
        return f"tensor types {info.type_names(newer)}"
    return None


def llama_cpp_problem(info: GGUFInfo) -> str | None:
    """What in the file the llama.cpp of llama-cpp-python 0.3.36 cannot run, or None."""
    if info.architecture not in LLAMA_CPP_ARCHITECTURES:
        return f"architecture {info.architecture}"
    return None
