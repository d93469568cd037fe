// Playground: send the message to /v1/adapters/{id}/generate twice (with and without the
// adapter) and stream both answers in as server-sent events. Without JavaScript the form posts
// to the page, which answers with both at once.
(function () {
  "use strict";
  const form = document.getElementById("playground-form");
  if (!form || !window.fetch || !window.TextDecoder) return;
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const errorBox = document.getElementById("playground-error");

  async function stream(withAdapter, target, body) {
    target.textContent = "";
    const response = await fetch(form.dataset.generateUrl, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      credentials: "same-origin",
      body: JSON.stringify(Object.assign({}, body, { stream: true, with_adapter: withAdapter })),
    });
    if (!response.ok) {
      const problem = await response.json().catch(function () { return {}; });
      throw new Error((problem.error && problem.error.message) || "The request failed.");
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") return;
        const event = JSON.parse(line);
        if (event.error) throw new Error(event.error.message);
        target.textContent += event.choices[0].delta.content || "";
      }
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    const messages = [];
    if (form.system.value.trim()) messages.push({ role: "system", content: form.system.value });
    messages.push({ role: "user", content: form.prompt.value });
    const body = {
      messages: messages,
      max_tokens: Number(form.max_tokens.value) || 128,
      temperature: Number(form.temperature.value) || 0,
    };
    const button = form.querySelector("button");
    button.disabled = true;
    Promise.all([
      stream(false, document.getElementById("answer-base"), body),
      stream(true, document.getElementById("answer-adapter"), body),
    ]).catch(function (error) {
      errorBox.textContent = error.message;
      errorBox.hidden = false;
    }).finally(function () { button.disabled = false; });
  });
})();
