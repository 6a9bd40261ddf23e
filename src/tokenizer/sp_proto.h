// Minimal protobuf wire-format editing of a serialized SentencePiece ModelProto (Debian ships
// no sentencepiece_model.pb.h), to set the normalizer flags the Hugging Face tokenizer applies.
#pragma once

#include <string>
#include <string_view>

namespace ernie::tokenizer {

// Returns `model` with NormalizerSpec.add_dummy_prefix and .remove_extra_whitespaces set as
// given; every other field is kept byte for byte. Throws ernie::Error on a malformed proto.
std::string set_normalizer_flags(std::string_view model, bool add_dummy_prefix,
                                 bool remove_extra_whitespaces);

// Reads NormalizerSpec.add_dummy_prefix (SentencePiece's default: true).
bool dummy_prefix_of(std::string_view model);

}  // namespace ernie::tokenizer
