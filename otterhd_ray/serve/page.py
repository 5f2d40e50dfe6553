"""The web page served at `/`: pick an image, ask, watch the answer stream (no build step, no CDN).

It posts to the same app's `/v1/chat/completions` with `stream: true` and reads the SSE body with `fetch`'s
reader, appending each chunk's `delta.content`; the API key field is only needed when the server sets one.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>OtterHD chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  form { display: grid; gap: .6rem; }
  textarea { width: 100%; min-height: 4rem; font: inherit; }
  #preview { max-width: 100%; max-height: 18rem; display: none; border: 1px solid #ccc; }
  #answer { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 6px; padding: .8rem; min-height: 3rem;
            background: #fafafa; }
  #status { color: #666; font-size: .9rem; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>OtterHD chat — <span id="model">model</span></h1>
<form id="ask">
  <label>Image <input id="image" type="file" accept="image/*"></label>
  <img id="preview" alt="selected image">
  <label>Question <textarea id="question" required>What is in this image?</textarea></label>
  <label>Max tokens <input id="max_tokens" type="number" value="64" min="1"></label>
  <label>API key (if the server needs one) <input id="api_key" type="password" autocomplete="off"></label>
  <button id="submit" type="submit">Ask</button>
</form>
<h2>Answer</h2>
<div id="answer"></div>
<p id="status"></p>
<script>
const $ = (id) => document.getElementById(id);
let imageUrl = null;
fetch("/v1/models").then(r => r.json()).then(j => { if (j.data) $("model").textContent = j.data[0].id; })
  .catch(() => {});
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) { imageUrl = null; return; }
  const reader = new FileReader();
  reader.onload = () => { imageUrl = reader.result; $("preview").src = imageUrl; $("preview").style.display = "block"; };
  reader.readAsDataURL(file);
});
$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const content = [{type: "text", text: $("question").value}];
  if (imageUrl) content.unshift({type: "image_url", image_url: {url: imageUrl}});
  const headers = {"Content-Type": "application/json"};
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
  $("answer").textContent = ""; $("answer").className = ""; $("status").textContent = "waiting...";
  $("submit").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify({
      model: $("model").textContent, messages: [{role: "user", content}],
      max_tokens: parseInt($("max_tokens").value, 10), stream: true})});
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || ("HTTP " + response.status));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null;
    while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) $("answer").textContent += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        $("status").textContent = "streaming...";
      }
    }
    $("status").textContent = "done (" + finish + ")";
  } catch (err) {
    $("answer").className = "error"; $("answer").textContent = String(err.message || err);
    $("status").textContent = "failed";
  } finally {
    $("submit").disabled = false;
  }
});
</script>
</body>
</html>
"""
