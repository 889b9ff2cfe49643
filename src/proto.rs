//! The generated `sdxld.v1` contract and its descriptor set.

/// Messages and services of package `sdxld.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("sdxld.v1");
}

/// The encoded `FileDescriptorSet` of proto/ (reflection, JSON).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sdxld_descriptor.bin"));

/// The descriptor pool of the contract.
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        // The set is produced by build.rs from the same sources; decoding cannot fail
        // unless the build itself is broken.
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes")
    })
}

/// A `GenerationSpec` as canonical proto3 JSON (as grpcurl and grpcio's json_format read it).
pub fn spec_to_json(spec: &v1::GenerationSpec) -> String {
    use prost::Message;
    let Some(descriptor) = descriptor_pool().get_message_by_name("sdxld.v1.GenerationSpec") else {
        return String::new();
    };
    let mut dynamic = prost_reflect::DynamicMessage::new(descriptor);
    if dynamic.merge(spec.encode_to_vec().as_slice()).is_err() {
        return String::new();
    }
    let options = prost_reflect::SerializeOptions::new().stringify_64_bit_integers(true);
    let mut out = serde_json::Serializer::new(Vec::new());
    if dynamic.serialize_with_options(&mut out, &options).is_err() {
        return String::new();
    }
    String::from_utf8(out.into_inner()).unwrap_or_default()
}

/// Parses proto3 JSON into a `GenerationSpec`.
pub fn spec_from_json(json: &str) -> Result<v1::GenerationSpec, String> {
    use prost::Message;
    let descriptor = descriptor_pool()
        .get_message_by_name("sdxld.v1.GenerationSpec")
        .ok_or("GenerationSpec is not in the descriptor set")?;
    let mut de = serde_json::Deserializer::from_str(json);
    let dynamic = prost_reflect::DynamicMessage::deserialize(descriptor, &mut de)
        .map_err(|e| e.to_string())?;
    v1::GenerationSpec::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| e.to_string())
}
