# @summary A value of the cluster file as TOML: strings quoted and escaped,
#   numbers and booleans bare, arrays and hashes (inline tables) recursively.
#
# @param value The value from the class's data.
# @return [String] The value in TOML syntax.
function warmspare::toml_value(
  Variant[String, Integer, Boolean, Array, Hash] $value,
) >> String {
  case $value {
    String: {
      $escaped = regsubst(regsubst(regsubst(regsubst($value,
        '\\\\', '\\\\\\\\', 'G'),
        '"', '\\\\"', 'G'),
        "\n", '\\\\n', 'G'),
        "\t", '\\\\t', 'G')
      "\"${escaped}\""
    }
    Integer, Boolean: { String($value) }
    Array: { "[${value.map |$v| { warmspare::toml_value($v) }.join(', ')}]" }
    Hash: {
      $pairs = $value.map |$k, $v| { "${warmspare::toml_value(String($k))} = ${warmspare::toml_value($v)}" }
      "{ ${pairs.join(', ')} }"
    }
    default: { fail("warmspare: cannot write ${value} in the cluster file") }
  }
}
