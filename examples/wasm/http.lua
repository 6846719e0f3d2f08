--* subject: funcs.wasmhttp
--* name: wasmhttp
--* executor: wasm
--* http: true
http.wasm
