//! The guest's side of `wasi:keyvalue`: the bindings, and the host
//! functions of an instance, which check the grant of every bucket opened.

use wasmtime::component::Resource;

use super::{KeyValue, KvError};
use crate::instance::InstanceState;

#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        path: "wit/deps/keyvalue",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: { "wasi:keyvalue/store.bucket": super::Bucket },
    });
}

pub use generated::wasi::keyvalue::{atomics, batch, store};

/// An open bucket, as the guest holds it.
pub struct Bucket {
    name: String,
}

/// What a guest sees of a host error: the bound it broke, or that the
/// store is unavailable (the host's own error text stays in its log).
fn guest_error(error: &KvError) -> store::Error {
    match error {
        KvError::AccessDenied(_) => store::Error::AccessDenied,
        KvError::Unavailable(_) => store::Error::Other("the key-value store is unavailable".into()),
        other => store::Error::Other(other.to_string()),
    }
}

impl InstanceState {
    /// The store and the name of an open bucket.
    fn bucket(&mut self, bucket: &Resource<Bucket>) -> wasmtime::Result<(KeyValue, String)> {
        let name = self.table().get(bucket)?.name.clone();
        let store = self
            .keyvalue()
            .ok_or_else(|| wasmtime::format_err!("a bucket is open without a store"))?;
        Ok((store, name))
    }

    /// Turns a store result into what the guest gets, logging failures of
    /// the store itself.
    fn settle<T>(&mut self, result: Result<T, KvError>) -> Result<T, store::Error> {
        result.map_err(|error| {
            if let KvError::Unavailable(why) = &error {
                self.warn(format_args!("key-value store failed: {why}"));
            }
            guest_error(&error)
        })
    }
}

impl store::Host for InstanceState {
    async fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
        if self.keyvalue().is_none() || !self.may_open(&identifier) {
            self.warn(format_args!(
                "bucket `{identifier}` denied: it is not in the process type's `keyvalue` list"
            ));
            return Ok(Err(store::Error::AccessDenied));
        }
        let bucket = self.table().push(Bucket { name: identifier })?;
        Ok(Ok(bucket))
    }
}

impl store::HostBucket for InstanceState {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let result = store.get(&name, &key).await;
        Ok(self.settle(result))
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let result = store.set(&name, &key, &value).await;
        Ok(self.settle(result))
    }

    async fn delete(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let result = store.delete(&name, &key).await;
        Ok(self.settle(result))
    }

    async fn exists(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let result = store.exists(&name, &key).await;
        Ok(self.settle(result))
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let result = store
            .list(&name, cursor)
            .await
            .map(|(keys, cursor)| store::KeyResponse { keys, cursor });
        Ok(self.settle(result))
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table().delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for InstanceState {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let result = store.increment(&name, &key, delta).await;
        Ok(self.settle(result))
    }
}

impl batch::Host for InstanceState {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            match store.get(&name, &key).await {
                Ok(value) => out.push(value.map(|v| (key, v))),
                Err(e) => return Ok(self.settle(Err(e))),
            }
        }
        Ok(Ok(out))
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        for (key, value) in key_values {
            if let Err(e) = store.set(&name, &key, &value).await {
                return Ok(self.settle(Err(e)));
            }
        }
        Ok(Ok(()))
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let (store, name) = self.bucket(&bucket)?;
        for key in keys {
            if let Err(e) = store.delete(&name, &key).await {
                return Ok(self.settle(Err(e)));
            }
        }
        Ok(Ok(()))
    }
}

/// Adds `wasi:keyvalue`'s three interfaces to `linker`.
pub fn add_to_linker(
    linker: &mut wasmtime::component::Linker<InstanceState>,
) -> wasmtime::Result<()> {
    type Me = wasmtime::component::HasSelf<InstanceState>;
    store::add_to_linker::<InstanceState, Me>(linker, |state| state)?;
    atomics::add_to_linker::<InstanceState, Me>(linker, |state| state)?;
    batch::add_to_linker::<InstanceState, Me>(linker, |state| state)?;
    Ok(())
}
